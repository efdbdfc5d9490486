"""A newcomer's first hour (issue #22), typed as a user types it: a fresh directory laid out like
a checkout, relative paths, the commands of the README. Mistakes are one line and leave no
trace; the rerun after fixing one trains; the log says what was found; the winner is one path
away; the console is quiet; --help says how."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from blockft_jax import cli
from test_cli import last_message, photo_folder, user_dir
from test_search import flat_arrays

# configs/photos.py shrunk to seconds: a random MobileNetV2 (width 0.35) at 32 px, one epoch.
SMALL = ["--config.model.weights=random", "--config.model.width=0.35",
         "--config.model.input_size=32", "--config.data.batch_size=8",
         "--config.train.epochs=1", "--config.train.seeds=1",
         "--config.search.strategies=('classifier_only','layerwise')",
         "--config.search.max_layers=2"]
# What a quiet console never shows: absl's prefix, JAX's backend probe, TensorFlow's notices.
NOISE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d|libtpu|oneDNN|cpu_feature_guard",
                   re.M)


def command(module, *args, cwd, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", f"blockft_jax.{module}", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def main(*args, cwd, **kwargs):
    return command("main", *args, cwd=cwd, **kwargs)


def assert_one_line_error(result, expected: str):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert expected in lines[0], (expected, lines[0])


@pytest.fixture
def checkout(tmp_path):
    cwd = user_dir(tmp_path)
    (cwd / "configs" / "broken.py").write_text(
        "from configs import default\n\n\ndef get_config():\n"
        "    config = default.get_config()\n    config.train.epochs = epoks\n    return config\n")
    return cwd


@pytest.mark.parametrize("args, expected", [
    (["--config", "configs/tiny.py", "--config.train.epoks=3"],
     "--config.train.epoks: the config has no key 'train.epoks' (did you mean train.epochs?)"),
    (["--config", "configs/tiny.py", "--config.epochs=3"], "(did you mean train.epochs?)"),
    (["--config", "configs/tiny.py", "--config.train.epochs=three"],
     "--config.train.epochs=three: train.epochs takes a whole number (now 2)"),
    (["--config", "configs/tiny.py", "--config.train.freeze_bn=maybe"], "True or False"),
    (["--config", "configs/nope.py"], "--config configs/nope.py: no such file; configs/ has "),
    (["--config", "configs/broken.py"],
     "--config configs/broken.py cannot be loaded (line 6): NameError: name 'epoks'"),
    (["--config", "configs/tiny.py", "--dryrun"], "unknown flag --dryrun; did you mean --dry_run?"),
    ([], "--config is required"),
    (["--config", "configs/tiny.py", "extra"], "unexpected argument(s) extra"),
    (["--config.train.epochs=3", "--config", "configs/tiny.py"], "put --config FILE first"),
])
def test_mistakes_are_one_line_and_leave_no_trace(checkout, args, expected):
    assert_one_line_error(main(*args, cwd=checkout), expected)
    assert not (checkout / "runs").exists()


@pytest.mark.parametrize("args, expected", [
    (["--config.data.path=photo"],
     "data.path='{cwd}/photo' is not a directory (it does not exist; did you mean "
     "'{cwd}/photos'?)"),
    (["--config.data.path=photos/cat/0.png"], "is not a directory (it is a file)"),
    (["--config.data.path=empty"], "Class folder(s) {cwd}/empty/b have no image files"),
    (["--config.data.name=cats_vs_dogz"],
     "Unknown dataset 'cats_vs_dogz': TFDS has no such dataset. Did you mean 'cats_vs_dogs'?"),
    (["--config.model.weights=my_weights.h5"], "model.weights='{cwd}/my_weights.h5': no such file"),
])
def test_dry_run_checks_the_folder_the_dataset_and_the_weights(checkout, args, expected):
    photo_folder(checkout / "photos")
    photo_folder(checkout / "empty", classes=("a",))
    (checkout / "empty" / "b").mkdir()
    result = main("--config", "configs/photos.py", *args, "--dry_run", cwd=checkout)
    assert_one_line_error(result, expected.format(cwd=checkout))
    assert not (checkout / "runs").exists()


def test_dry_run_lists_the_classes_it_found(checkout):
    photo_folder(checkout / "photos", per_class=5)
    (checkout / "photos" / "owl" / "notes.txt").write_text("not an image file")
    result = main("--config", "configs/photos.py", "--dry_run", cwd=checkout)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"Data: image folder {checkout / 'photos'}: 3 classes, 15 image files (decoded on the "
            "first run): cat (5), dog (5), owl (5).") in result.stdout
    assert "Weights: Keras's ImageNet file for mobilenet_v2" in result.stdout
    assert "Plan: mobilenet_v2" in result.stdout and not (checkout / "runs").exists()
    assert not NOISE.search(result.stderr), result.stderr


@pytest.fixture(scope="module")
def photos_search(tmp_path_factory):
    """A photos search as the README's walkthrough runs it (shrunk), after a typo in data.path."""
    cwd = user_dir(tmp_path_factory.mktemp("newcomer"))
    photo_folder(cwd / "photos")
    typo = main("--config", "configs/photos.py", *SMALL, "--config.data.path=photo", cwd=cwd)
    found = main("--config", "configs/photos.py", *SMALL, cwd=cwd)
    return cwd, typo, found


def test_a_typo_then_the_fix_trains_and_the_log_says_what_it_found(photos_search):
    cwd, typo, found = photos_search
    assert_one_line_error(typo, f"did you mean {str(cwd / 'photos')!r}?")
    assert found.returncode == 0, found.stderr[-3000:]
    log = found.stderr
    assert f"Found 36 images in 3 classes (cat, dog, owl) in {cwd / 'photos'}" in log
    assert "Splits: train 24, validation 6, test 6 images; validation and test carved from " \
           "train, stratified by class" in log
    assert not NOISE.search(log), log
    summary = json.loads((cwd / "runs" / "photos" / "summary.json").read_text())
    last = log.strip().splitlines()[-1]
    assert last.endswith(f"Done. Winner: {summary['winner']['candidate']} (validation "
                         f"{summary['winner']['val_accuracy']['mean']:.3f}); its model: "
                         "runs/photos/models/best; report: runs/photos/report.md"), last
    assert (cwd / "runs" / "photos" / "search.log").read_text().rstrip().endswith(
        last.split(" ", 1)[1])
    assert (cwd / "runs" / "photos" / ".lock").read_text() == ""  # names no finished process


def assert_best_is_the_winner(workdir):
    from blockft_jax.engine import checkpoint
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["best_model"] == "models/best"
    best, meta = checkpoint.load_model(workdir / "models" / "best")
    winner, winner_meta = checkpoint.load_model(workdir / "models" / summary["winner"]["strategy"])
    assert meta == winner_meta and meta["candidate"] == summary["winner"]["candidate"]
    best, winner = flat_arrays(best), flat_arrays(winner)
    assert best.keys() == winner.keys()
    assert all(np.array_equal(best[k], winner[k]) and best[k].dtype == winner[k].dtype
               for k in best)


def test_the_winner_is_one_path_away_and_survives_a_rerun(photos_search):
    cwd, _, _ = photos_search
    workdir = cwd / "runs" / "photos"
    assert_best_is_the_winner(workdir)
    files = {p.relative_to(workdir / "models" / "best"): p.read_bytes()
             for p in (workdir / "models" / "best").rglob("*") if p.is_file()}
    again = main("--config", "configs/photos.py", *SMALL, cwd=cwd)  # finished: nothing trains
    assert again.returncode == 0, again.stderr[-3000:]
    assert "its model: runs/photos/models/best" in again.stderr.strip().splitlines()[-1]
    assert_best_is_the_winner(workdir)
    assert files == {p.relative_to(workdir / "models" / "best"): p.read_bytes()
                     for p in (workdir / "models" / "best").rglob("*") if p.is_file()}


def test_predict_and_export_take_the_workdir(photos_search):
    cwd, _, _ = photos_search
    by_workdir = command("predict", "--model", "runs/photos", "photos/cat", cwd=cwd)
    by_folder = command("predict", "--model", "runs/photos/models/best", "photos/cat",
                        "--batch_size", "5", cwd=cwd)
    old_spelling = command("predict", "--model", "runs/photos/models/best", "photos/cat",
                           "--batch-size", "5", cwd=cwd)
    for result in (by_workdir, by_folder, old_spelling):
        assert result.returncode == 0, result.stderr[-3000:]
        assert not NOISE.search(result.stderr), result.stderr
    rows = by_workdir.stdout.splitlines()
    assert rows[0] == "path,class,probability" and len(rows) == 13
    assert rows[1].startswith("photos/cat/0.png,")
    assert by_workdir.stdout == by_folder.stdout == old_spelling.stdout
    # Not a model, but a search's folder: the saved models there are named.
    (cwd / "old_search" / "models" / "layerwise").mkdir(parents=True)
    (cwd / "old_search" / "models" / "layerwise" / "model.json").write_text("{}")
    assert_one_line_error(command("predict", "--model", "old_search", "photos", cwd=cwd),
                          "old_search is not a saved model (no model.json) and has no "
                          "models/best; pass one of: old_search/models/layerwise.")
    exported = command("export", "--model", "runs/photos", "--out", "photos.keras", cwd=cwd)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (cwd / "photos.keras").stat().st_size > 0


def test_a_failed_start_gives_way_to_the_fixed_config(checkout):
    """A run that stops before its first candidate trains (here: a class folder of unreadable
    files, found only when decoding) leaves nothing that blocks the fixed rerun, although the
    fix changes the config."""
    photo_folder(checkout / "photos")
    photo_folder(checkout / "broken")
    for file in (checkout / "broken" / "owl").iterdir():
        file.write_bytes(b"not an image")
    args = ["--config", "configs/photos.py", *SMALL, "--workdir", "runs/mine"]
    failed = main(*args, "--config.data.path=broken", cwd=checkout)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert errors == [failed.stderr.strip().splitlines()[-1]] and "owl have no readable" in \
        errors[0], failed.stderr[-3000:]
    fixed = main(*args, cwd=checkout)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "trained nothing, with data.path different: starting afresh" in fixed.stderr
    assert (checkout / "runs" / "mine" / "models" / "best" / "model.json").exists()
    stored = json.loads((checkout / "runs" / "mine" / "config.json").read_text())
    assert stored["data"]["path"] == str(checkout / "photos")


def test_help_lists_the_options_and_how_to_override_config_keys(checkout):
    help_ = main("--help", cwd=checkout)
    assert help_.returncode == 0, help_.stderr
    for text in ("--config.<key>=<value>", "--show_config", "--dry_run", "--workdir",
                 "(default: 'false')", "--verbosity"):
        assert text in help_.stdout, (text, help_.stdout)
    listing = main("--config", "configs/tiny.py", "--config.train.epochs=4", "--show_config",
                   cwd=checkout)
    assert listing.returncode == 0, listing.stderr
    assert "train.epochs = 4" in listing.stdout and "data.path = None" in listing.stdout
    for module, texts in (("predict", ("--batch_size BATCH_SIZE, --batch-size BATCH_SIZE",
                                       "(default: 32)", "WORKDIR/models/best")),
                          ("export", ("--model MODEL", "--out OUT", "WORKDIR/models/best")),
                          ("report", ("--workdir WORKDIR",))):
        result = command(module, "--help", cwd=checkout)
        assert result.returncode == 0, result.stderr
        assert all(text in result.stdout for text in texts), (module, result.stdout)
    assert_one_line_error(command("predict", "--model", "x", "a.jpg", "--bach_size", "3",
                                  cwd=checkout), "unrecognized arguments: --bach_size 3")


def test_verbosity_brings_back_other_libraries_notices(checkout):
    """Quiet by default; --verbosity=0 shows JAX's own INFO lines (the backend probe)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # let JAX probe
    quiet = main("--config", "configs/tiny.py", "--dry_run", cwd=checkout, env=env)
    loud = main("--config", "configs/tiny.py", "--dry_run", "--verbosity=0", cwd=checkout,
                env=env)
    assert quiet.returncode == loud.returncode == 0, (quiet.stderr, loud.stderr)
    # Only our own progress (the estimate's timing), none of JAX's notices.
    assert re.fullmatch(r"(\d\d:\d\d:\d\d [^\n]*\n)*", quiet.stderr), quiet.stderr
    assert "Unable to initialize backend" in loud.stderr, loud.stderr
    # TensorFlow (TFDS datasets' input pipeline) prints its C++ notices when it is imported;
    # on a CPU with AVX-512, oneDNN's comes before TensorFlow reads its log level.
    for variable in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):
        env.pop(variable, None)
    importing = ("import os; from blockft_jax import cli; cli.setup_logging({}); "
                 "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), "
                 "os.environ.get('TF_ENABLE_ONEDNN_OPTS')); import tensorflow")
    tf_quiet, tf_loud = (subprocess.run([sys.executable, "-c", importing.format(verbosity)],
                                        cwd=checkout, env=env, capture_output=True, text=True)
                         for verbosity in ("", "0"))
    assert tf_quiet.returncode == tf_loud.returncode == 0, (tf_quiet.stderr, tf_loud.stderr)
    assert tf_quiet.stderr == "", tf_quiet.stderr
    # --verbosity: TensorFlow's defaults.
    assert (tf_quiet.stdout, tf_loud.stdout) == ("1 0\n", "None None\n")


def test_adamw_is_accepted(checkout):
    result = main("--config", "configs/tiny.py", "--config.train.optimizer=adamw",
                  "--config.train.weight_decay=0.01", "--dry_run", cwd=checkout)
    assert result.returncode == 0, result.stderr


def test_adamw_is_adam_with_weight_decay():
    import jax
    import ml_collections
    from blockft_jax.engine import train
    params = {"conv": {"kernel": np.ones((3, 3), np.float32), "bias": np.ones(3, np.float32)}}
    grads = jax.tree.map(lambda p: 0.5 * p, params)
    mask = jax.tree.map(lambda p: True, params)
    updates = {}
    for name in ("adam", "adamw"):
        cfg = ml_collections.ConfigDict({"optimizer": name, "learning_rate": 0.1,
                                         "weight_decay": 0.01, "epochs": 1})
        tx = train.make_optimizer(cfg, 10)
        updates[name], _ = tx.update(grads, tx.init(params), params, mask=mask)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(updates["adam"]),
                                                    jax.tree.leaves(updates["adamw"])))
    # Decay reaches the kernel (decoupled, as AdamW), never the bias.
    cfg = ml_collections.ConfigDict({"optimizer": "adamw", "learning_rate": 0.1,
                                     "weight_decay": 0.0, "epochs": 1})
    tx = train.make_optimizer(cfg, 10)
    plain, _ = tx.update(grads, tx.init(params), params, mask=mask)
    assert not np.array_equal(plain["conv"]["kernel"], updates["adamw"]["conv"]["kernel"])
    assert np.array_equal(plain["conv"]["bias"], updates["adamw"]["conv"]["bias"])


def test_an_unexpected_error_names_only_a_log_that_exists(tmp_path, monkeypatch, caplog):
    """A bug in a dry run keeps its traceback; no log was written, so none is named."""
    import logging

    from blockft_jax import launch
    from blockft_jax.search import plan
    from configs import tiny

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(plan, "describe", broken)
    with caplog.at_level(logging.INFO):
        assert launch.run(tiny.get_config(), str(tmp_path / "wd"), dry_run_only=True) == 1
    assert any(r.exc_info for r in caplog.records), "no traceback logged"
    last = last_message(caplog)
    assert "RuntimeError: a bug" in last and last.endswith("the traceback is above.")
    assert not (tmp_path / "wd").exists()


def test_libtpu_without_a_tpu_is_quiet_and_a_tpu_vm_is_left_alone(monkeypatch):
    """libtpu (installed for --target) on a machine without TPUs: a one-host slice is named so
    that it prints nothing as JAX starts; where a TPU may be attached, nothing is touched (the
    runtime must describe the real slice). The user's own values are kept."""
    names = ("TPU_SKIP_MDS_QUERY", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
             "TPU_WORKER_ID")
    for name in names:  # set, then removed: what the test sets is undone after it
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    installed = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else installed(name, *a))
    monkeypatch.setattr(cli, "_tpu_may_be_attached", lambda: True)
    cli.setup_logging()  # as every command sets up its console
    assert not [name for name in names if name in os.environ]
    monkeypatch.setattr(cli, "_tpu_may_be_attached", lambda: False)
    monkeypatch.setenv("TPU_WORKER_ID", "3")
    cli.setup_logging()
    assert os.environ["TPU_ACCELERATOR_TYPE"] == "v4-8"
    assert os.environ["TPU_WORKER_HOSTNAMES"] == "localhost"
    assert os.environ["TPU_WORKER_ID"] == "3"
