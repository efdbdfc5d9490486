"""--dry_run --target tpu:...: the search's steps compiled for a TPU slice on this machine (with
libtpu; those tests are skipped without it), the chip table's roofline, the search's time
estimate, and one-line errors for a bad target or a missing libtpu."""
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from blockft_jax import target
from configs import tiny

ROOT = Path(__file__).parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip "
                                  "install -e '.[tpu]'): TPU slices cannot be compiled for")


def main(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "blockft_jax.main", "--config",
                           "configs/tiny.py", "--dry_run", *args], cwd=ROOT, timeout=timeout,
                          capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def cost(flops, nbytes):
    return target.StepCost(flops, nbytes, 0, 0, 0, 0)


def test_roofline_is_the_slower_of_compute_and_memory():
    chip = target.CHIPS["v5e"]
    assert target.roofline(cost(197e12, 0), chip) == pytest.approx(1.0)
    assert target.roofline(cost(0, 819e9), chip) == pytest.approx(1.0)
    assert target.roofline(cost(197e12, 2 * 819e9), chip) == pytest.approx(2.0)


def test_search_seconds_counts_cohort_epochs_and_steps():
    train_step, eval_step = cost(1, 0), cost(2, 0)
    # 10 runs, 18 run-epochs (a schedule's: some runs stopped early), in cohorts of 4.
    engine = target.EngineCost("block_16", runs=10, run_epochs=18, cohort_size=4,
                               eval_batch_multiple=2, train_step=train_step,
                               eval_step=eval_step)
    seconds = {train_step: 1.0, eval_step: 3.0}
    # 5 cohort-epochs x (4 train steps + 2 validation steps) + 3 cohorts x 1 test step
    got = target.search_seconds([engine], (100, 60, 40), 25, seconds.__getitem__)
    assert got == {"seconds": 5 * (4 * 1 + 2 * 3) + 3 * 1 * 3, "block_16": 59.0}
    # Auto-RGN's 3 runs (in one cohort) measure on 5 batches (4: the epoch's) each of 6 epochs.
    measured = dataclasses.replace(engine, measurements=((3, 6, 5),))
    got = target.search_seconds([measured], (100, 60, 40), 25, seconds.__getitem__)
    assert got["block_16"] == 59.0 + 6 * 4 * 1.0


@pytest.mark.parametrize("bad", ["v5e:2x4", "gpu:h100", "tpu:v9:2x2", "tpu:v5e"])
def test_a_bad_target_is_one_line(bad):
    with pytest.raises(target.TargetError, match="--target"):
        target.slice_devices(bad)


def test_target_needs_dry_run():
    result = subprocess.run([sys.executable, "-m", "blockft_jax.main", "--config",
                             "configs/tiny.py", "--target", "tpu:v5e:2x2"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --target")


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed: the message is for machines "
                                       "without it")
def test_without_libtpu_target_says_what_to_install():
    result = main("--target", "tpu:v5e:2x2")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "error:" in last and "pip install -e '.[tpu]'" in last


@needs_libtpu
def test_unknown_topology_is_one_line():
    with pytest.raises(target.TargetError, match="libtpu cannot describe"):
        target.slice_devices("tpu:v5e:3x7")


@needs_libtpu
@pytest.mark.parametrize("name, chips, hosts", [("tpu:v5e:2x2", 4, 1), ("tpu:v4:2x2x4", 16, 4)])
def test_dry_run_compiles_for_a_slice(name, chips, hosts):
    """The tiny search's real steps compiled for a single-host and a multi-host slice: the
    layout and cohort the search would choose, memory per chip against HBM, flops, bytes and
    the roofline times, and the whole search's estimate."""
    result = main("--target", name)
    assert result.returncode == 0, result.stderr[-3000:]
    # libtpu's warnings about a TPU VM it is not on are silenced.
    assert "TPU_ACCELERATOR_TYPE" not in result.stderr and "E0000" not in result.stderr
    out = result.stdout
    assert f"Target {name}: {chips} x TPU" in out and f"on {hosts} host(s)" in out
    engines = [line for line in out.splitlines() if line.startswith("On the slice, engine ")]
    # The engines by depth and full's (from the stem), each once.
    units = [line.split(":")[0].split()[-1] for line in engines]
    assert len(units) >= 2 and len(set(units)) == len(units) and units[-1] == "stem", units
    for line in engines:  # each chip trains runs of its own (batches of 8 are not cut)
        runs = int(line.split(": ")[1].split(" runs")[0])
        size = int(line.split("cohorts of ")[1].split(",")[0])
        layout = line.split("laid out ")[1]
        assert size % chips == 0 or size >= runs, line
        assert layout.startswith(f"{chips} runs x 1 data"), line
    steps = [line for line in out.splitlines() if "train step per chip" in line]
    assert len(steps) == len(units) and all("GFLOP" in s and "roofline" in s for s in steps)
    assert "Estimated search time on " + name in out


def test_the_slices_model_has_the_tpus_convolutions():
    """Traced on this CPU, 'auto' would give shifted multiply-adds for depthwise convolutions;
    the programs compiled for a slice have the grouped convolutions a TPU runs."""
    config = tiny.get_config()
    module = target.tpu_module(config, 3)
    x = np.zeros((2, 32, 32, 3), np.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(lambda v: module.apply(v, x, train=False))(variables))
    groups = {int(n) for n in re.findall(r"feature_group_count=(\d+)", jaxpr)}
    assert max(groups) > 1, "no grouped (depthwise) convolution in the slice's model"
    assert config.model.options.depthwise_impl is None  # the user's config is left as it is
