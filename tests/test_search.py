"""The search end to end on configs/tiny.py: outputs, resume, and bad input."""
import json
import shutil

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from blockft_jax import checkpoint, groups, models, search
from blockft_jax.workdir import WorkdirError
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


def test_every_strategy_and_output(finished):
    workdir, summary = finished
    rows = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert {r["strategy"] for r in rows} == set(groups.STRATEGIES)
    assert set(summary["strategies"]) == set(groups.STRATEGIES)
    assert summary["train_step_compilations"] == 2
    # Each engine's steps compiled once (ahead, in the background) and were reused.
    run_record = json.loads((workdir / "runs.jsonl").read_text().splitlines()[-1])
    counts = {unit: (c["train"], c["eval"]) for unit, c in run_record["compilations"].items()}
    assert len(counts) == 2 and "stem" in counts and set(counts.values()) == {(1, 1)}, counts
    assert 0 < run_record["compile_blocking_seconds"] <= run_record["compile_seconds"]
    for name in ("summary.json", "report.md", "report.png", "config.json"):
        assert (workdir / name).exists(), name
    report = (workdir / "report.md").read_text()
    for label in ("Classifier only", "Full fine-tuning", "Layer-wise", "Top-k", "Blocks",
                  "Sliding window"):
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


def test_report_rebuilds_from_the_workdir(finished, tmp_path):
    from blockft_jax import report
    workdir, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    original = (copy / "report.md").read_text()
    (copy / "report.md").unlink()
    (copy / "report.png").unlink()
    report.main(["--workdir", str(copy)])
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
    module = search.build_module(config, 3)
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


def test_resume_after_interruption_gives_the_same_summary(finished, tmp_path, monkeypatch):
    _, uninterrupted = finished
    saves = {"n": 0}
    original = search.Checkpoint.save

    def preempted(self, *args, **kwargs):  # dies right after the 5th epoch checkpoint
        original(self, *args, **kwargs)
        saves["n"] += 1
        if saves["n"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(search.Checkpoint, "save", preempted)
    with pytest.raises(KeyboardInterrupt):
        search.run(tiny_config(), tmp_path)
    monkeypatch.setattr(search.Checkpoint, "save", original)
    done_before = len((tmp_path / "results.jsonl").read_text().splitlines())
    assert 0 < done_before < 10
    assert (tmp_path / "checkpoints" / "current.json").exists()
    resumed = search.run(tiny_config(), tmp_path)
    assert resumed == uninterrupted


def test_second_process_is_refused(tmp_path):
    from blockft_jax.workdir import Workdir
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
    from blockft_jax import weights
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


def run_cli(*args, cwd):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "blockft_jax.main", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_refuses_a_config_typo_and_bad_values(tmp_path):
    from pathlib import Path
    root = Path(__file__).parents[1]
    typo = run_cli("--config", "configs/tiny.py", "--config.train.epoks=3",
                   "--workdir", str(tmp_path / "a"), cwd=root)
    assert typo.returncode != 0 and "epoks" in typo.stderr
    bad = run_cli("--config", "configs/tiny.py", "--config.model.name=resnet18",
                  "--workdir", str(tmp_path / "b"), cwd=root)
    assert bad.returncode == 2
    assert "model.name='resnet18' is unknown" in bad.stderr
    assert "Traceback" not in bad.stderr
