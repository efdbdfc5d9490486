"""scripts/benchmark.py end to end at toy sizes: both blockft_jax levels next to Keras on
TensorFlow with the same trained set, and the input-pipeline check on TFDS mock data."""
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from blockft_jax.common import cores

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "benchmark.py"
TOY = ["--model", "mobilenet_v2", "--trainable", "block_16", "--size", "32", "--images", "16",
       "--batch", "8", "--epochs", "1"]


def run(*extra):
    proc = subprocess.run([sys.executable, str(SCRIPT), *TOY, *extra], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def rate(out, name):
    match = re.search(rf"^{name} images_per_s=(\S+)$", out, re.M)
    assert match, out
    return float(match.group(1))


def test_both_levels_next_to_keras_with_the_same_trained_set():
    out = run("--frameworks", "blockft_jax,blockft_jax_step,keras_tf")
    for name in ("blockft_jax", "blockft_jax_step", "keras_tf"):
        value = rate(out, name)
        assert math.isfinite(value) and value > 0, out
    assert "trained set matches keras_tf: 6 weighted backbone layers + head" in out
    assert re.search(r"^ratio blockft_jax_step/keras_tf = \d", out, re.M), out
    assert "fine-tuning (prefix cache), from_unit=block_16" in out
    assert "| blockft_jax_step |" in out and "| step, from_unit=block_16" in out


def test_compile_programs_gives_each_engines_seconds_by_kind():
    out = run("--compile-programs", "head,block_16", "--runs", "2")
    rows = re.findall(r"^\| (head|block_16) \| (\w+) \| ([^|]+) \| ([\d.]+) \| ([\d.]+) \| "
                      r"([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert [r[:2] for r in rows] == [("head", "head"), ("block_16", "block_16")], out
    for row in rows:  # on CPU both engines keep their prefix cache in device memory
        assert row[2] == "prefix cache, an epoch a program", out
        assert all(float(x) > 0 for x in row[3:5]) and float(row[6]) > 0, out


def test_input_pipeline_check_on_mock_tf_flowers():
    out = run("--input-check", "--mock-data", "--no-cache")
    assert "tf_flowers (TFDS mock data) loaded by data.load_dataset" in out
    assert rate(out, "pipeline") > 0 and rate(out, "device_resident") > 0
    assert re.search(r"^ratio pipeline/device_resident = \d", out, re.M), out


def test_against_a_commit_that_is_not_there_is_one_line_and_no_checkout(tmp_path):
    """--against checks out the commit beside this one (git worktree): one that is not there
    ends in one line before anything trains, and leaves no checkout behind."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--against", "no-such-commit",
                           "--scratch", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "--against no-such-commit: no checkout of it"), proc.stderr
    assert not (tmp_path / "tree").exists() and not (tmp_path / "before").exists()


@pytest.mark.slow
def test_search_level_benchmark_on_the_tiny_search(tmp_path):
    """--search end to end (Keras loop aside: the tiny model's `blocks` option has no Keras
    counterpart; one cache state, to keep the suite short): one at a time and the default,
    ratios; one at a time on one device, the default on one a physical core. Its kept
    workdirs go to the test's own temporary directory."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--search", "--no-keras", "--cache-states", "empty",
         "--search-config", "configs/tiny.py", "--search-override=--config.train.epochs=1",
         "--search-override=--config.search.strategies=('classifier_only','layerwise')"],
        capture_output=True, text=True, timeout=900,
        env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("one at a time", "default"):
        assert f"| {name} | empty |" in out, out
    assert "| filled |" not in out
    ratio = float(re.search(r"^search_wall_ratio=(\S+)$", out, re.M).group(1))
    assert math.isfinite(ratio) and ratio > 0, out
    (kept,) = tmp_path.glob("blockft_search_bench_*")
    assert f"workdirs, kept for their logs and reports: {kept}" in proc.stderr
    devices = {name: (kept / name / "search.log").read_text() for name in ("empty-1", "empty-0")}
    assert " 1 device(s): cpu" in devices["empty-1"]  # one at a time
    assert cores.physical_cores() == 1 or "as XLA_FLAGS asks" in devices["empty-1"]
    assert f" {cores.physical_cores()} device(s): cpu, one per physical core" in devices["empty-0"]


@pytest.mark.slow
def test_keras_search_loop_trains_and_extrapolates(tmp_path):
    """The Keras hand loop --search compares against: the demo's Keras-expressible runs, the
    first one trained (one epoch) and the whole search extrapolated from it."""
    config = tmp_path / "one_epoch.py"
    config.write_text("from configs import demo\n\n\ndef get_config():\n"
                      "    config = demo.get_config()\n    config.train.epochs = 1\n"
                      "    return config\n")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "keras_search_loop.py"), "--backend", "tensorflow",
         "--config", str(config), "--runs", "1"],
        capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Left out (Keras has no per-layer learning rate): gradual" in proc.stdout
    assert re.search(r"^\[1/\d+\] classifier_only +seed 0: val ", proc.stdout, re.M), proc.stdout
    assert re.search(r"^EXTRAPOLATED \(from 1 of \d+ runs\)", proc.stdout, re.M), proc.stdout


def test_search_outcome_gives_every_strategys_selection_and_work(tmp_path):
    """--recipes' per-strategy table reads a finished search's files: each strategy's selected
    candidate, its accuracies over seeds, and the runs and run-epochs of all its candidates."""
    import importlib.util
    import json

    from blockft_jax.search import results
    from test_results import CONFIG, fake_search
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rows = fake_search(tmp_path / results.PREDICTIONS_DIR,
                       {"classifier_only": 0.5, "topk:2": 0.8, "topk:3": 0.6, "full": 0.7})
    for i, row in enumerate(rows):
        row["epochs"] = 10 + i
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = results.summarize(CONFIG, rows, 2,
                                predictions_dir=tmp_path / results.PREDICTIONS_DIR)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    outcome = benchmark._search_outcome(str(tmp_path))
    topk = outcome["strategies"]["topk"]
    assert topk["selected"] == "topk:2" and topk["runs"] == 6
    assert topk["run_epochs"] == sum(r["epochs"] for r in rows if r["strategy"] == "topk")
    assert topk["val"] == summary["strategies"]["topk"]["selected"]["val_accuracy"]
    assert set(outcome["strategies"]) == {"classifier_only", "topk", "full"}
