"""The command line as users type it: relative paths, no --workdir, --dry_run of every README
command, bad values, and the errors users see (one line when they can fix it, a traceback and
where the log is when they cannot)."""
import errno
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockft_jax import launch, target
from blockft_jax.common import cores
from blockft_jax.common.workdir import Workdir
from blockft_jax.search import search
from configs import tiny

ROOT = Path(__file__).parents[1]
FAST = ["--config.train.epochs=1", "--config.search.strategies=('classifier_only','layerwise')"]


def run_cli(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "blockft_jax.main", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def user_dir(tmp_path) -> Path:
    """A directory laid out as a user's checkout: configs/ beside where they type."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    return tmp_path


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]


def last_message(caplog) -> str:
    """The last line blockft_jax logged (orbax's background checkpoint writer may log after it)."""
    return [r for r in caplog.records if r.name.startswith("blockft_jax")][-1].getMessage()


def test_relative_and_default_workdir_with_a_resume(tmp_path):
    """No --workdir: results go to runs/<config name>; killed mid-search (kill -9) and rerun
    with the relative --workdir typed out, the search resumes there and finishes. Nothing in
    XLA_FLAGS: the command gives JAX one CPU device per physical core."""
    cwd = user_dir(tmp_path)
    args = ["--config", "configs/tiny.py", *FAST]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    process = subprocess.Popen([sys.executable, "-m", "blockft_jax.main", *args], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env)
    results = cwd / "runs" / "tiny" / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not (
            results.exists() and results.read_text().count("\n") >= 1):
        time.sleep(0.2)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    output = process.communicate()[0]
    assert results.exists(), output
    assert f"Results go to {cwd / 'runs' / 'tiny'}" in output
    devices = cores.physical_cores()
    assert f"{devices} device(s): cpu, one per physical core" in output, output
    before = rows(cwd / "runs" / "tiny")
    resumed = run_cli(*args, "--workdir", "runs/tiny", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = rows(cwd / "runs" / "tiny")
    assert after[:len(before)] == before and len(after) == 1 + tiny.get_config().search.max_layers
    assert (cwd / "runs" / "tiny" / "models" / "layerwise" / "model.json").exists()
    assert (cwd / "runs" / "tiny" / "summary.json").exists()


def readme_commands() -> list[str]:
    """Every `python -m blockft_jax.main ...` command of the README, continuation lines
    joined."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines()
            if line.strip().startswith("python -m blockft_jax.main")]


def test_every_readme_command_dry_runs(tmp_path):
    """In a fresh checkout, with the made-up photos of the README's walkthrough."""
    cwd = user_dir(tmp_path)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "example_photos.py")], cwd=cwd,
                   check=True, capture_output=True)
    commands = readme_commands()
    assert len(commands) >= 5, commands
    for command in commands:
        argv = shlex.split(command.split("#")[0])[3:]
        if "--target" in argv:  # compiling for a slice takes minutes: tests/test_target.py
            at = argv.index("--target")
            target.parse(argv[at + 1])
            del argv[at:at + 2]
        result = run_cli(*argv, "--dry_run", cwd=cwd)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert "Plan:" in result.stdout and "Runs:" in result.stdout, command
        assert "Engine from unit" in result.stdout and "Estimated time" in result.stdout, command


def test_dry_run_prints_the_plan_without_data_or_training(tmp_path):
    result = run_cli("--config", "configs/tiny.py", "--dry_run",
                     "--workdir", str(tmp_path / "wd"), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("Strategies, in the order they run: classifier_only, layerwise, topk, "
                     "blocks, window, gradual, full, llrd, lp_ft, l2sp, auto_rgn, subtuning",
                     "layerwise:", "Runs: 20", "subtuning: in rounds",
                     "Engine from unit stem (full, llrd, lp_ft, l2sp, auto_rgn)",
                     "window, gradual, subtuning): prefix cache",
                     "bytes per image", "Train-step compilations: 2",
                     f"Results would go to {tmp_path / 'wd'}"):
        assert expected in out, (expected, out)
    assert not (tmp_path / "wd").exists()  # nothing written, nothing trained


@pytest.mark.parametrize("override,message", [
    ("--config.data.batch_size=0", "data.batch_size=0"),  # a value the plan's checks refuse
    ("--config.model.options.minimalistic=True", "minimalistic"),  # a key this model lacks
])
def test_bad_values_are_one_line(override, message, tmp_path):
    result = run_cli("--config", "configs/tiny.py", override, "--dry_run", cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr


@pytest.mark.parametrize("key,value,message", [
    ("data.batch_size", 0, "data.batch_size=0"),
    ("train.learning_rate", -1.0, "train.learning_rate=-1"),
    ("train.epochs", 0, "train.epochs=0"),
    ("data.splits", (0.5, 0.5, 0.5), "data.splits"),
    ("search.window", 0, "search.window=0"),
    ("train.optimizer", "lion", "train.optimizer='lion'"),
    ("search.llrd_decays", (0.5, 1.5), "search.llrd_decays=(0.5, 1.5)"),
    ("search.llrd_decays", (0.0,), "search.llrd_decays=(0.0,)"),
    ("search.gradual_epochs", (0,), "search.gradual_epochs=(0,)"),
    ("search.auto_rgn_batches", 0, "search.auto_rgn_batches=0"),
    ("search.lp_epochs", 2, "search.lp_epochs=2: LP-FT probes the head"),  # tiny: 2 epochs
    ("search.l2sp_alphas", (0.01, -0.1), "search.l2sp_alphas=(0.01, -0.1)"),
    ("search.l2sp_beta", -1.0, "search.l2sp_beta=-1.0"),
])
def test_bad_values_are_refused_in_one_line_before_any_work(key, value, message, tmp_path,
                                                            caplog):
    """The dry run's checks, in process (the command line's path to them is tested above)."""
    config = tiny.get_config()
    section, leaf = key.split(".")
    config[section][leaf] = value
    with caplog.at_level(logging.INFO):
        assert launch.run(config, str(tmp_path / "wd"), dry_run_only=True) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and not errors[0].exc_info, [r.getMessage() for r in errors]
    text = errors[0].getMessage()
    assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert not (tmp_path / "wd").exists()


def test_documented_model_options_work_from_the_command_line():
    result = run_cli("--config", "configs/mobilenet_v3_small.py",
                     "--config.model.options.minimalistic=True", "--dry_run", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mobilenet_v3_small" in result.stdout


def test_cli_refuses_a_config_typo_and_checks_before_any_work(tmp_path):
    typo = run_cli("--config", "configs/tiny.py", "--config.train.epoks=3",
                   "--workdir", str(tmp_path / "a"), cwd=ROOT)
    assert typo.returncode != 0 and "epoks" in typo.stderr
    bad = run_cli("--config", "configs/tiny.py", "--config.model.name=resnet18",
                  "--workdir", str(tmp_path / "b"), cwd=ROOT)
    assert bad.returncode == 2
    assert "model.name='resnet18' is unknown" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_an_unexpected_error_keeps_its_traceback_and_names_the_log(tmp_path, monkeypatch,
                                                                  caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("XLA fell over")

    monkeypatch.setattr(search, "run", broken)
    with caplog.at_level(logging.INFO):
        status = launch.run(tiny.get_config(), str(tmp_path / "wd"))
    assert status == 1
    assert any(r.exc_info for r in caplog.records), "no traceback logged"
    last = last_message(caplog)
    assert "XLA fell over" in last and str(tmp_path / "wd" / "search.log") in last
    logged = (tmp_path / "wd" / "search.log").read_text()
    assert "Traceback" in logged and "XLA fell over" in logged


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, caplog):
    config = tiny.get_config()
    config.train.epochs = 1
    config.search.strategies = ("classifier_only", "layerwise")
    original = Workdir.append_result
    calls = []

    def full_disk(self, row):
        calls.append(row)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "results.jsonl"))
        original(self, row)

    monkeypatch.setattr(Workdir, "append_result", full_disk)
    with caplog.at_level(logging.INFO):
        status = launch.run(config, str(tmp_path / "wd"))
    assert status == 2
    last = last_message(caplog)
    assert "disk is full" in last and str(tmp_path / "wd" / "results.jsonl") in last
    assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.ERROR)
    kept = rows(tmp_path / "wd")
    assert len(kept) == 2  # whole rows, nothing torn
    monkeypatch.setattr(Workdir, "append_result", original)
    assert launch.run(config, str(tmp_path / "wd")) == 0
    finished = rows(tmp_path / "wd")
    assert finished[:2] == kept and len(finished) == 1 + config.search.max_layers


def photo_folder(root: Path, classes=("cat", "dog", "owl"), per_class=12) -> Path:
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def image_folder_config(path: str):
    config = tiny.get_config()
    config.data.name, config.data.path = "image_folder", path
    config.data.classes, config.data.train_per_class = None, None
    config.train.epochs = 1
    config.search.strategies = ("classifier_only", "layerwise")
    return config


def test_image_folder_with_broken_files_skips_them_and_lists_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photos = photo_folder(tmp_path / "photos")
    (photos / "dog" / "empty.png").write_bytes(b"")
    good = (photos / "cat" / "0.png").read_bytes()
    (photos / "cat" / "cut.png").write_bytes(good[: len(good) // 3])
    assert launch.run(image_folder_config("photos"), "runs/photos") == 0
    listed = (tmp_path / "runs" / "photos" / "skipped_files.txt").read_text()
    assert str(photos / "dog" / "empty.png") in listed and str(photos / "cat" / "cut.png") in listed
    assert len(listed.splitlines()) == 2
    assert (tmp_path / "runs" / "photos" / "summary.json").exists()


def test_image_folder_with_an_unreadable_class_is_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    photos = photo_folder(tmp_path / "photos")
    for file in (photos / "owl").iterdir():
        file.write_bytes(b"not an image")
    with caplog.at_level(logging.INFO):
        assert launch.run(image_folder_config("photos"), "runs/photos") == 2
    last = last_message(caplog)
    assert "owl" in last and "\n" not in last
    assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.ERROR)
    assert not (tmp_path / "runs" / "photos" / "results.jsonl").exists()
