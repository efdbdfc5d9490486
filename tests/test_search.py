"""The search end to end on configs/tiny.py: outputs, resume, and bad input."""
import json
import logging
import shutil
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from blockft_jax import launch, models
from blockft_jax.candidates import strategies
from blockft_jax.common.workdir import WorkdirError
from blockft_jax.engine import checkpoint, placement
from blockft_jax.engine import cohort as cohort_lib
from blockft_jax.search import costs, engines, plan, search
from configs import tiny

ROW_KEYS = {"strategy", "candidate", "layers", "seed", "epochs", "val_accuracy", "test_accuracy",
            "final_val_accuracy", "val_loss", "train_seconds", "steps", "status"}


def tiny_config(**overrides):
    config = tiny.get_config()
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One uninterrupted tiny search (every strategy), shared by the checks below."""
    workdir = tmp_path_factory.mktemp("tiny")
    summary = search.run(tiny_config(), workdir)
    return workdir, summary


def same_engines(source: Path, workdir: Path) -> None:
    """The engine split of `source` for the search about to run in `workdir`: the split is
    this machine's decision from timed steps (engines.json, made once per workdir), and two
    searches compared bitwise must train each run from the same unit."""
    if (source / search.ENGINES).exists():
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / search.ENGINES, workdir / search.ENGINES)


def engine_count(workdir: Path) -> int:
    """The engines a search trained in: its split's (engines.json, else one) and full's."""
    path = workdir / search.ENGINES
    return 1 + (len(json.loads(path.read_text())["engines"]) if path.exists() else 1)


def test_every_strategy_and_output(finished):
    workdir, summary = finished
    rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert {r["strategy"] for r in rows} == set(strategies.SEARCH_ORDER)
    assert set(summary["strategies"]) == set(strategies.SEARCH_ORDER)
    assert summary["train_step_compilations"] == engine_count(workdir)
    # Each engine's steps compiled once (ahead, in the background) and were reused.
    run_record = json.loads((workdir / "runs.jsonl").read_text().splitlines()[-1])
    counts = {unit: (c["train"], c["eval"]) for unit, c in run_record["compilations"].items()}
    assert len(counts) == engine_count(workdir) and "stem" in counts and set(counts.values()) == {(1, 1)}, counts
    # Auto-RGN's measurement compiled once, by the whole network's engine that trains it only,
    # whatever the masks did between epochs.
    norms = {unit: c["norms"] for unit, c in run_record["compilations"].items()}
    assert norms.pop("stem") == 1 and set(norms.values()) <= {0}, norms
    assert 0 < run_record["compile_blocking_seconds"] <= run_record["compile_seconds"]
    # What each engine's programs took to compile, by kind: those it compiled, and only those.
    for unit, c in run_record["compilations"].items():
        took = c["seconds"]
        assert took["train"] > 0 and took["eval"] > 0 and took["state"] > 0, (unit, took)
        assert (took["norms"] > 0) == (c["norms"] > 0), (unit, took)
    for name in ("summary.json", "report.md", "report.png", "config.json"):
        assert (workdir / name).exists(), name
    report = (workdir / "report.md").read_text()
    for label in ("Classifier only", "Full fine-tuning", "Layer-wise", "Top-k", "Blocks",
                  "Sliding window", "Layer-wise LR decay", "Gradual unfreezing", "LP-FT",
                  "L2-SP", "Auto-RGN"):
        assert label in report
    # TensorBoard scalars: one run directory per (candidate, seed), one point per epoch.
    runs = sorted(p.name for p in (workdir / "tensorboard").iterdir())
    assert len(runs) == len(rows) and "full-seed0" in runs, runs
    events = event_accumulator.EventAccumulator(str(workdir / "tensorboard" / "full-seed0"))
    events.Reload()
    full = next(r for r in rows if r["candidate"] == "full" and r["seed"] == 0)
    assert [e.step for e in events.Scalars("val_accuracy")] == list(range(1, full["epochs"] + 1))
    assert events.Scalars("val_accuracy")[full["best_epoch"] - 1].value == pytest.approx(
        full["val_accuracy"])


def test_predictions_and_paired_comparisons(finished):
    """Every run's per-example predictions are kept, agree with its row, and the summary
    compares the winner with every other strategy's selected candidate on both splits."""
    from blockft_jax.search import results
    workdir, summary = finished
    rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    labels = np.load(workdir / "predictions" / "labels.npz")
    for r in rows:
        with np.load(results.prediction_path(workdir / "predictions", r["candidate"],
                                             r["seed"])) as p:
            assert np.mean(p["validation"] == labels["validation"]) == pytest.approx(
                r["val_accuracy"], abs=1e-9)
    others = {s["selected"]["candidate"] for s in summary["strategies"].values()} - {
        summary["winner"]["candidate"]}
    for split in ("validation", "test"):
        compared = {c["b"] for c in summary["comparisons"] if c["split"] == split}
        assert compared == others, (split, compared, others)
    assert isinstance(summary["distinguishable"], bool) and summary["verdict"]
    assert "Is the winner better?" in (workdir / "report.md").read_text()


def test_each_seed_draws_its_head_and_every_candidate_shares_it(tmp_path):
    from blockft_jax.common.workdir import Workdir
    s = search.Search(tiny_config(), Workdir(tmp_path), search.CompileClock())
    seed0, again, seed1 = s.start_variables(0), s.start_variables(0), s.start_variables(1)
    a, b, c = flat_arrays(seed0), flat_arrays(again), flat_arrays(seed1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for k in a:
        assert np.array_equal(a[k], c[k]) == (not k.startswith("params/head/kernel")), k


def test_a_cohorts_runs_are_let_go_before_the_next_trains(tmp_path, monkeypatch):
    """A finished cohort's results (each run's final variables on the device) are gone when
    the next cohort of the engine starts: placement budgets one cohort's state, not two."""
    import gc
    import weakref
    alive, run_cohort = [], search.Search.run_cohort

    def watched(self, *args, **kwargs):
        gc.collect()
        assert not any(ref() is not None for ref in alive), "the last cohort's runs live on"
        finished, ckpt = run_cohort(self, *args, **kwargs)
        alive.extend(weakref.ref(result) for _, result in finished)
        return finished, ckpt

    monkeypatch.setattr(search.Search, "run_cohort", watched)
    search.run(tiny_config(**{"search.strategies": ("classifier_only", "layerwise"),
                              "search.parallel": 1}), tmp_path)
    assert len(alive) >= 3  # cohorts of one, one after another


@pytest.mark.parametrize("shared", [0.0, 1.0])
def test_on_cpu_the_default_forms_cohorts_only_where_they_pay(tmp_path, monkeypatch, caplog,
                                                              shared):
    """search.parallel=0 on CPU: the machine's measured speed decides each engine. A step of
    which nothing is shared between runs trains them one at a time (logged, and kept in
    cohorts.json); a step that is all shared trains them in cohorts."""
    measured = costs.Speed(seconds_per_flop=1e-12, compile_seconds=1.0, measured_on="test",
                           step_seconds=1.0, shared_step_seconds=shared)
    monkeypatch.setattr(costs, "measure_once", lambda *args, **kwargs: measured)
    config = tiny_config(**{"search.parallel": 0,
                            "search.strategies": ("classifier_only", "layerwise", "full")})
    with caplog.at_level(logging.INFO):
        search.run(config, tmp_path)
    record = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[-1])
    sizes = {unit: c["cohorts"] for unit, c in record["compilations"].items()}
    caps = {unit: p["figures"]["caps"]
            for unit, p in json.loads((tmp_path / placement.COHORTS).read_text()).items()}
    several = [unit for unit, c in caps.items() if c["runs"] > 1]
    assert several, caps
    if shared:
        assert all(max(sizes[u]) > 1 and "CPU speed-up" not in caps[u] for u in several), sizes
    else:
        assert all(sizes[u] == [1] and caps[u]["CPU speed-up"] == 1 for u in several), sizes
        assert "one at a time on each device, not in cohorts of" in caplog.text


def test_report_rebuilds_from_the_workdir(finished, tmp_path):
    from blockft_jax import report as report_command
    workdir, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    original = (copy / "report.md").read_text()
    (copy / "report.md").unlink()
    (copy / "report.png").unlink()
    report_command.main(["--workdir", str(copy)])
    assert (copy / "report.md").read_text() == original
    assert (copy / "report.png").stat().st_size > 0


def test_selection_is_best_mean_validation(finished):
    workdir, summary = finished
    rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    for strategy, s in summary["strategies"].items():
        means = {}
        for r in rows:
            if r["strategy"] == strategy:
                means.setdefault(r["candidate"], []).append(r["val_accuracy"])
        best = max(np.mean(v) for v in means.values())
        assert np.isclose(s["selected"]["val_accuracy"]["mean"], best)
    overall = max(s["selected"]["val_accuracy"]["mean"] for s in summary["strategies"].values())
    assert np.isclose(summary["winner"]["val_accuracy"]["mean"], overall)


def test_topk_uses_layerwise_ranking(finished):
    _, summary = finished
    ranking = [c["layers"][0] for c in summary["strategies"]["layerwise"]["ranking"]]
    topk = summary["strategies"]["topk"]["ranking"][0]
    assert set(topk["layers"]) == set(ranking[:2])


def test_saved_models_load_and_frozen_layers_unchanged(finished):
    workdir, summary = finished
    config = tiny_config()
    module = plan.build_module(config, 3)
    start = module.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    for strategy in ("layerwise", "classifier_only"):
        variables, meta = checkpoint.load_model(workdir / "models" / strategy)
        assert meta["candidate"] == summary["strategies"][strategy]["selected"]["candidate"]
        trained = set(meta["layers"]) | {"head"}
        for layer, params in start["params"].items():
            same = all(np.array_equal(params[k], variables["params"][layer][k]) for k in params)
            assert same == (layer not in trained), layer
        logits = module.apply(variables, np.zeros((2, 32, 32, 3), np.float32))
        assert logits.shape == (2, 3)


def test_one_run_methods_are_baselines_with_saved_models(finished):
    """The one-run methods (llrd, gradual, lp_ft, l2sp, auto_rgn): every candidate trained
    every seed to the end (never pruned), ranked, their selected candidate saved and compared
    with the winner; what each left frozen is bitwise the start."""
    workdir, summary = finished
    config = tiny_config()
    rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    module = plan.build_module(config, 3)
    start = module.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    batchnorm = {r.name for r in models.layer_table(module, (32, 32, 3))
                 if r.kind == "batchnorm"}
    # L2-SP's engine (the whole network's) alone carries the starting weights.
    searched = plan.make_plan(config, models.layer_table(module, (32, 32, 3)), module)
    assert searched.anchored(searched.first_unit)
    assert not any(searched.anchored(unit) for unit in searched.engines)
    expected = {"llrd": len(config.search.llrd_decays),
                "gradual": len(config.search.gradual_epochs), "lp_ft": 1,
                "l2sp": len(config.search.l2sp_alphas), "auto_rgn": 1}
    compared = {c["b"] for c in summary["comparisons"]} | {summary["winner"]["candidate"]}
    for strategy, count in expected.items():
        mine = [r for r in rows if r["strategy"] == strategy]
        assert len(mine) == count * config.train.seeds, strategy
        assert all(r["status"] == "ok" and r["epochs"] == config.train.epochs for r in mine)
        ranking = summary["strategies"][strategy]["ranking"]
        assert len(ranking) == count
        selected = summary["strategies"][strategy]["selected"]["candidate"]
        assert selected in compared, strategy
        variables, meta = checkpoint.load_model(workdir / "models" / strategy)
        assert meta["candidate"] == selected and meta["strategy"] == strategy
        for layer, params in start["params"].items():
            same = all(np.array_equal(params[k], variables["params"][layer][k]) for k in params)
            if layer not in meta["layers"] and layer != "head":
                assert same, (strategy, layer)
        if strategy == "auto_rgn":  # BatchNorm never trains there
            assert batchnorm and not batchnorm & set(meta["layers"])
            for layer in batchnorm:
                for collection in ("params", "batch_stats"):
                    assert all(np.array_equal(v, variables[collection][layer][k])
                               for k, v in start[collection][layer].items()), layer


def flat_arrays(tree):
    from flax import traverse_util
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def assert_same_models(workdir_a, workdir_b):
    """The saved models themselves, array by array, bitwise; and their model.json."""
    strategies = sorted(p.name for p in (workdir_a / "models").iterdir())
    assert strategies == sorted(p.name for p in (workdir_b / "models").iterdir())
    for strategy in strategies:
        (a, meta_a), (b, meta_b) = (checkpoint.load_model(w / "models" / strategy)
                                    for w in (workdir_a, workdir_b))
        assert meta_a == meta_b, strategy
        a, b = flat_arrays(a), flat_arrays(b)
        assert a.keys() == b.keys(), strategy
        differing = [k for k in a if not np.array_equal(a[k], b[k])]
        assert not differing, (strategy, differing[:5], len(differing))


RESUME_CONFIG = {"search.strategies": ("classifier_only", "full"), "train.epochs": 6,
                 "train.learning_rate": 3e-3}


def test_resume_after_a_checkpoint_past_the_best_epoch_saves_the_best_model(tmp_path,
                                                                             monkeypatch):
    """Killed right after a checkpoint written later than the run's best epoch, then rerun:
    the saved models are the best epochs' (bitwise the uninterrupted run's), not the state at
    the checkpoint, and the summary is the same."""
    uninterrupted = search.run(tiny_config(**RESUME_CONFIG), tmp_path / "whole")
    original = checkpoint.Checkpoint.save
    killed = []

    def preempted(self, state, histories, epoch):
        # As with train.checkpoint_seconds > 0, earlier epochs were not saved: the first
        # checkpoint of the run comes after its best epoch, then the process dies.
        best_epoch = cohort_lib.best_record(histories[0])["epoch"]
        if best_epoch < epoch and not killed:
            original(self, state, histories, epoch)
            self.ckptr.wait_until_finished()
            killed.append((self.keys[0], epoch, best_epoch))
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpoint, "save", preempted)
    with pytest.raises(KeyboardInterrupt):
        search.run(tiny_config(**RESUME_CONFIG), tmp_path / "cut")
    assert killed, "no run had a checkpoint after its best epoch: the test needs one"
    assert (tmp_path / "cut" / "checkpoints" / "current.json").exists()
    monkeypatch.setattr(checkpoint.Checkpoint, "save", original)
    resumed = search.run(tiny_config(**RESUME_CONFIG), tmp_path / "cut")
    assert resumed == uninterrupted
    assert_same_models(tmp_path / "whole", tmp_path / "cut")


def interrupt_after_the_first_checkpoint(monkeypatch):
    """Checkpoint.save raises KeyboardInterrupt once its save is whole (after the first epoch of
    the first cohort); returns the original save."""
    original = checkpoint.Checkpoint.save

    def preempting(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.ckptr.wait_until_finished()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpoint, "save", preempting)
    return original


def test_resume_mid_cohort_gives_the_same_summary_and_models(finished, tmp_path, monkeypatch):
    """Killed after the first epoch checkpoint of a cohort (several runs trained at once, the
    search's default), then rerun: the same summary and the same saved models, bitwise."""
    _, uninterrupted = finished
    original = interrupt_after_the_first_checkpoint(monkeypatch)
    same_engines(finished[0], tmp_path)
    with pytest.raises(KeyboardInterrupt):
        search.run(tiny_config(), tmp_path)
    monkeypatch.setattr(checkpoint.Checkpoint, "save", original)
    meta = json.loads((tmp_path / "checkpoints" / "current.json").read_text())
    assert len(meta["runs"]) > 1, meta["runs"]
    done_before = len((tmp_path / "results.jsonl").read_text().splitlines()) if (
        tmp_path / "results.jsonl").exists() else 0
    assert done_before < 10
    resumed = search.run(tiny_config(), tmp_path)
    assert resumed == uninterrupted
    assert_same_models(finished[0], tmp_path)


# Layer-wise trains 3 runs in the top engine, top-k 1 after them: placed in cohorts of 4, padded
# runs that a cut compiles away.
PADDED = {"search.strategies": ("layerwise", "topk")}


@pytest.mark.slow
def test_padded_runs_cut_away_and_the_same_cohorts_on_a_rerun(tmp_path, monkeypatch):
    """With any padding worth cutting (no epochs asked of it), each rung's runs train
    in equal cohorts no larger than placed, each size compiled once; killed after the first
    checkpoint and rerun, the search forms the same cohorts: the same summary and models."""
    monkeypatch.setattr(placement, "PADDING_COHORT_EPOCHS", 0)
    compiled_on = []  # a smaller size's compilation: the thread it ran on
    compile_size = engines.Engines._compile_size

    def recording(self, *args):
        compiled_on.append(threading.current_thread().name)
        return compile_size(self, *args)

    monkeypatch.setattr(engines.Engines, "_compile_size", recording)
    whole = search.run(tiny_config(**PADDED), tmp_path / "whole")
    # Engines placed in an earlier rung compile their sizes ahead, off the training thread.
    assert any(name.startswith("compile") for name in compiled_on), compiled_on
    record = json.loads((tmp_path / "whole" / "runs.jsonl").read_text().splitlines()[-1])
    top = record["compilations"][max(record["compilations"], key=lambda u: len(
        record["compilations"][u]["cohorts"]))]
    assert {3, 1} <= set(top["cohorts"]), record["compilations"]
    assert all(c["train"] == len(c["cohorts"]) for c in record["compilations"].values())
    original = interrupt_after_the_first_checkpoint(monkeypatch)
    same_engines(tmp_path / "whole", tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        search.run(tiny_config(**PADDED), tmp_path / "cut")
    monkeypatch.setattr(checkpoint.Checkpoint, "save", original)
    assert search.run(tiny_config(**PADDED), tmp_path / "cut") == whole
    assert_same_models(tmp_path / "whole", tmp_path / "cut")


def test_changing_keys_that_cannot_change_results_still_resumes(finished, tmp_path):
    workdir, summary = finished
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    before = (copy / "results.jsonl").read_text()
    config = tiny_config(**{"train.checkpoint_seconds": 5.0, "train.prefix_cache": False,
                            "data.data_dir": str(tmp_path / "elsewhere")})
    assert search.run(config, copy) == summary  # everything was done: nothing trains again
    assert (copy / "results.jsonl").read_text() == before
    assert json.loads((copy / "config.json").read_text())["train"]["checkpoint_seconds"] == 5.0


def test_second_process_is_refused(tmp_path):
    from blockft_jax.common.workdir import Workdir
    holder = Workdir(tmp_path)
    holder.lock()
    try:
        with pytest.raises(WorkdirError, match="in use"):
            search.run(tiny_config(), tmp_path)
    finally:
        holder.unlock()


def test_different_config_refused_unless_start_over(finished, tmp_path):
    workdir, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    before = (copy / "results.jsonl").read_text()
    with pytest.raises(WorkdirError, match="different config.*train.epochs|train"):
        search.run(tiny_config(**{"train.epochs": 3}), copy)
    assert (copy / "results.jsonl").read_text() == before  # nothing lost
    # start_over archives, never deletes
    config = tiny_config(**{"search.strategies": ("classifier_only",), "train.epochs": 1})
    search.run(config, copy, start_over=True)
    archived = list((copy / "archive").glob("*/results.jsonl"))
    assert archived and archived[0].read_text() == before


def test_start_over_logs_on_in_the_workdirs_log(finished, tmp_path, caplog):
    """--start_over archives the earlier search with a copy of its log; the new search logs on
    in workdir/search.log, the file its messages point to."""
    workdir, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    (copy / "search.log").write_text("the earlier search's log\n")
    config = tiny_config(**{"search.strategies": ("classifier_only",), "train.epochs": 1})
    with caplog.at_level(logging.INFO):
        assert launch.run(config, str(copy), start_over=True) == 0
    (archived,) = (copy / "archive").glob("*/search.log")
    assert archived.read_text().startswith("the earlier search's log\n")
    live = (copy / "search.log").read_text()
    assert live.startswith("the earlier search's log\n") and "Done. Winner" in live, live


@pytest.mark.parametrize("stop", ["compiling", "after_a_checkpoint"])
def test_a_search_with_no_finished_run_takes_a_changed_config(tmp_path, monkeypatch, stop):
    """Stopped before any run finished -- its first epoch failed (a compilation, out of memory)
    after the engines' split and the first cohort's scalars were written, or it was interrupted
    after the first cohort's first checkpoint -- then rerun with a fixed config: it starts
    afresh, and the unfinished runs' checkpoint is moved to archive/, not lost."""
    config = tiny_config(**{"search.strategies": ("classifier_only", "layerwise"),
                            "train.epochs": 2, "train.checkpoint_seconds": 0.0})
    if stop == "compiling":
        def failing(*args, **kwargs):
            raise RuntimeError("XLA compilation failed")
        monkeypatch.setattr(cohort_lib, "train_epoch", failing)
    else:
        interrupt_after_the_first_checkpoint(monkeypatch)
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        search.run(config, tmp_path)
    monkeypatch.undo()
    left = {e.name for e in tmp_path.iterdir()}
    assert {search.ENGINES, "tensorboard"} <= left and "results.jsonl" not in left, left
    assert ("checkpoints" in left) == (stop == "after_a_checkpoint"), left
    fixed = tiny_config(**{"search.strategies": ("classifier_only", "layerwise"),
                           "train.epochs": 1})
    summary = search.run(fixed, tmp_path)
    assert set(summary["strategies"]) == {"classifier_only", "layerwise"}
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 1
    archived = list((tmp_path / "archive").glob("*/checkpoints"))
    assert len(archived) == (stop == "after_a_checkpoint"), archived


@pytest.mark.parametrize("override,message", [
    ({"model.name": "resnet18"}, "model.name='resnet18' is unknown"),
    ({"search.strategies": ("layerwise", "greedy")}, "unknown \\['greedy'\\]"),
    ({"search.strategies": ("topk",)}, "topk.*layerwise"),
    ({"data.name": "imagenet21k"}, "Unknown dataset 'imagenet21k'"),
    ({"search.topk": (2, 9)}, "k=9.*max_layers=3"),
    ({"search.block_boundaries": "pooling,relu"}, "\\['relu'\\] unknown"),
])
def test_bad_config_is_a_clear_error(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        search.run(tiny_config(**override), tmp_path)


def test_weights_file_for_another_model(tmp_path):
    from blockft_jax.inputs import weights
    other = models.create("mobilenet_v2", width=0.5, blocks=3, num_classes=3)
    variables = other.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    path = tmp_path / "other.msgpack"
    weights.save_variables(path, variables)
    with pytest.raises(weights.WeightsError, match="do not fit"):
        search.run(tiny_config(**{"model.weights": str(path)}), tmp_path / "wd")


def test_diverged_candidate_is_recorded_and_search_goes_on(tmp_path):
    config = tiny_config(**{"train.optimizer": "sgd", "train.learning_rate": 1e38,
                            "train.epochs": 1,
                            "search.strategies": ("classifier_only", "layerwise")})
    summary = search.run(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert any(r["status"] == "diverged" for r in rows)
    assert len(rows) == 1 + config.search.max_layers
    assert "layerwise" in summary["strategies"]
