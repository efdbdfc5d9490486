"""Layouts: a cohort's runs spread over the mesh's 'runs' axis and each run's batch over its
'data' axis. Runs exchange nothing (the compiled steps' all-reduces stay within one run's data
group; none at all with one device per run), and every layout trains what one device trains,
up to float order."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blockft_jax.candidates import strategies
from blockft_jax.engine import placement
from cpu_devices import cpu_devices_env

WORKER = Path(__file__).with_name("layout_worker.py")
ROOT = Path(__file__).parents[1]


def run_worker(mode: str, *args, devices: int = 8):
    env = {**os.environ, **cpu_devices_env(devices)}
    result = subprocess.run([sys.executable, str(WORKER), mode, *map(str, args)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_layouts_give_devices_runs_before_cutting_batches():
    # More runs than devices: one device per run, whatever the batch.
    assert placement.layout(8, 60, 25) == (8, 1)
    assert placement.layout(32, 60, 128) == (32, 1)
    # Fewer runs than devices: a run takes several devices, its batch split evenly...
    assert placement.layout(8, 2, 32) == (2, 4)
    assert placement.layout(8, 1, 128) == (1, 8)
    assert placement.layout(4, 3, 128) == (2, 2)
    # ... but never into slivers (32 / 8 = 4 rows) nor unevenly (25): devices stay idle.
    assert placement.layout(8, 1, 32) == (2, 4)
    assert placement.layout(8, 1, 25) == (8, 1)
    assert placement.layout(1, 10, 25) == (1, 1)
    # A run that does not fit one device takes more (`fits`, e.g. from its compiled step).
    assert placement.layout(8, 60, 128, fits=lambda layout: layout[1] >= 4) == (2, 4)
    assert placement.layout(8, 60, 128, fits=lambda layout: False) == (1, 8)
    with pytest.raises(ValueError):
        placement.layout(0, 1, 8)


def test_fit_to_memory_keeps_the_cohort_a_multiple_of_the_runs_axis():
    # 4 'runs' positions; per device: 10 MB fixed, 5 MB a run held there.
    compile_for = lambda k, multiple: {"train": 10 + 5 * (k // 4), "eval": 10 + k // 4}
    fit = lambda free, size: placement.fit_to_memory(compile_for, size, free=free,
                                                     resident=lambda k: 0, fixed=10, cpu=False,
                                                     step=4)
    assert fit(1000, 32)[0] == 32
    assert fit(30, 32)[0] == 16     # 4 runs a device: 16 in all
    assert fit(26, 32)[0] == 12
    assert fit(11, 32)[0] == 4      # never fewer than one run a position


@pytest.fixture(scope="module")
def hlo(tmp_path_factory):
    out = tmp_path_factory.mktemp("hlo") / "hlo.json"
    run_worker("hlo", out)
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", ["fed", "gathered"])
def test_runs_exchange_nothing(hlo, kind):
    """8 CPU devices: 8x1 compiles without any collective (metrics stay with their runs); in
    4x2 and 1x8 every all-reduce (gradients, BatchNorm statistics, the loss) stays within one
    run's data group."""
    assert hlo[f"8x1/{kind}"]["all_reduces"] == {"train": [], "eval": []}
    assert hlo[f"8x1/{kind}"]["other_collectives"] == {"train": [], "eval": []}
    for layout in ("4x2", "1x8"):
        found = hlo[f"{layout}/{kind}"]
        data_groups = [set(g) for g in found["data_groups"]]
        reduces = [g for step in found["all_reduces"].values() for groups in step for g in groups]
        assert found["all_reduces"]["train"], "a split batch needs its gradients summed"
        for group in reduces:
            assert any(set(group) <= data for data in data_groups), (layout, group)


@pytest.mark.slow
def test_every_layout_trains_what_one_device_trains(tmp_path):
    """8 runs (4 candidates x 2 seeds) fed and from the device cache, 4 steps: every step's
    loss, the validation losses and the heads after them agree with one device's."""
    out = tmp_path / "steps.npz"
    run_worker("steps", out)
    found = dict(np.load(out))
    for kind in ("fed", "gathered"):
        single = {key: found[f"single/{kind}/{key}"] for key in ("losses", "val_loss", "head")}
        assert single["losses"].shape == (4, 8) and np.all(np.isfinite(single["losses"]))
        for layout in ("8x1", "4x2", "1x8"):
            np.testing.assert_allclose(found[f"{layout}/{kind}/losses"], single["losses"],
                                       atol=1e-5, rtol=0)
            np.testing.assert_allclose(found[f"{layout}/{kind}/val_loss"], single["val_loss"],
                                       atol=1e-5, rtol=0)
            np.testing.assert_allclose(found[f"{layout}/{kind}/head"], single["head"],
                                       atol=1e-5, rtol=0)


@pytest.mark.slow
def test_the_tiny_search_in_every_layout_agrees_with_one_device(tmp_path):
    """configs/tiny.py (every digit of its classes, so that runs learn; the strategies of every
    engine and step input, layout_worker.search) on one device and on 4
    CPU devices forced to 2x2 (runs and a split batch at once, the layout with the most to get
    wrong: 8x1's, 4x2's and 1x8's steps are compared above, and placement's choice of 8x1 by
    test_layouts_give_devices_runs_before_cutting_batches; 4 devices, not 8: 28 s against
    36 s on two cores): the same runs and the same winner,
    at the same validation accuracy. (Run by run, float order grows over a hundred steps --
    most of all in `full`, whose BatchNorm statistics are summed over the data axis -- so single
    runs are compared step by step above, and the winner among the engines by depth here.)"""
    def rows(workdir):
        found = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
        return {(r["candidate"], r["seed"]): r for r in found}

    def best_by_depth(workdir):
        """The leader of the strategies trained in the engines by depth. The whole network's
        runs are left out: at this rate they swing (validation loss 2-8, accuracy 0.33-0.64
        between layouts of the same search, float order; measured), so their rank says nothing
        about the layout; their rows are still compared by key, their steps above."""
        summary = json.loads((workdir / "summary.json").read_text())
        return max((s["selected"] for name, s in summary["strategies"].items()
                    if name not in strategies.WHOLE_NETWORK),
                   key=lambda c: c["val_accuracy"]["mean"])

    run_worker("search", tmp_path / "single", "auto", devices=1)
    want = rows(tmp_path / "single")
    winner = best_by_depth(tmp_path / "single")
    log = run_worker("search", tmp_path / "2x2", "2x2", devices=4)
    assert "laid out as 2 runs x 2 data" in log
    assert rows(tmp_path / "2x2").keys() == want.keys()
    best = best_by_depth(tmp_path / "2x2")
    assert best["candidate"] == winner["candidate"]
    assert best["val_accuracy"] == winner["val_accuracy"]
