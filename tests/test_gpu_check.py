"""scripts/gpu_check.py: its blockft_jax side end to end on CPU, one run and a cohort (a smoke
test; the real figures need a GPU), which frameworks a row runs, and the helpers that pick the
peak FLOP/s and read XLA's cost analysis."""
import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_blockft_rows_on_cpu():
    """The single run and a cohort of 2 runs (one vmapped step), both at the step level."""
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--frameworks",
           "blockft_jax,blockft_jax_cohort", "--cohort", "2", "--models", "mobilenet_v2",
           "--trainable", "top", "--batch", "2", "--size", "32", "--steps", "1", "--warmup", "1",
           "--width", "0.35"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    rows = {}
    for framework, runs in (("blockft_jax", 1), ("blockft_jax_cohort", 2)):
        line = re.search(rf"^gpu_check model=mobilenet_v2 trainable=block_16 "
                         rf"framework={framework} images_per_s=(\S+) mfu=(\S+) .* runs={runs} "
                         rf"per_run_images_per_s=(\S+) ok=yes$", out, re.M)
        assert line, out + proc.stderr
        images_per_s, per_run = float(line.group(1)), float(line.group(3))
        assert math.isfinite(images_per_s) and images_per_s > 0
        assert per_run == pytest.approx(images_per_s / runs, rel=1e-3)
        assert line.group(2) == "nan"  # no peak FLOP/s for a CPU
        flops = float(re.search(r"flops_per_step=(\S+)", line.group(0)).group(1))
        assert flops > 0
        rows[framework] = flops
    # The cohort's step is both runs' work: about twice one run's FLOPs.
    assert rows["blockft_jax_cohort"] == pytest.approx(2 * rows["blockft_jax"], rel=0.2)
    ratios = re.search(r"^cohort model=mobilenet_v2 trainable=block_16 runs=2 "
                       r"aggregate/single=(\S+) per_run/single=(\S+)$", out, re.M)
    assert ratios and all(math.isfinite(float(x)) and float(x) > 0 for x in ratios.groups()), out
    # The step level (no prefix cache) from the top block, training exactly Keras's block_16*.
    assert "from_unit=block_16" in out and "step (no prefix cache)" in out
    # Compiled once each: the jitted step reused the AOT executable.
    assert out.count("'train': 1") == 2, out
    assert out.count("trained Keras layers (6 + head): block_16_expand, block_16_expand_BN") == 2
    assert "2 runs in one vmapped step" in out


def test_rows_run_in_order_and_full_fine_tuning_has_no_cohort_row():
    gc = load_script()
    every = ["blockft_jax_cohort", "torch", "blockft_jax"]
    # The cohort last: under --time-limit it gets what the comparison with torch left.
    assert gc.row_frameworks(every, "block_16", 8) == ["blockft_jax", "torch",
                                                       "blockft_jax_cohort"]
    assert gc.row_frameworks(every, "all", 8) == ["blockft_jax", "torch"]
    assert gc.row_frameworks(every, "block_16", 0) == ["blockft_jax", "torch"]


def test_peak_table_and_cost_analysis_forms():
    gc = load_script()
    assert gc.peak_flops("NVIDIA H100 80GB HBM3", None) == (989e12, "H100 SXM bf16 dense")
    assert gc.peak_flops("NVIDIA H100 PCIe", None)[0] == 756e12
    assert gc.peak_flops("NVIDIA H200", None)[0] == 989e12
    assert gc.peak_flops("cpu", None)[0] is None
    assert gc.peak_flops("cpu", 1e12) == (1e12, "--peak-flops")
    assert gc._flops({"flops": 10.0}) == 10.0
    assert gc._flops([{"flops": 4.0}, {"flops": 6.0}]) == 10.0  # older JAX: a list per module
    assert math.isnan(gc._flops(None)) and math.isnan(gc._flops({"flops": -1.0}))


def test_torch_mapping_covers_torchvision():
    torchvision = pytest.importorskip("torchvision")
    gc = load_script()
    torch = pytest.importorskip("torch")
    net = torchvision.models.mobilenet_v2(weights=None)
    net.classifier = torch.nn.Linear(net.last_channel, 5)  # as run_torch's new head
    names = gc.torch_keras_names("mobilenet_v2", net)
    assert names["features.17.conv.0.0"] == ["block_16_expand"]  # Keras block_16 = features[17]
    assert names["features.18.0"] == ["Conv_1"]
    net = torchvision.models.resnet50(weights=None)
    net.fc = torch.nn.Linear(net.fc.in_features, 5)
    names = gc.torch_keras_names("resnet50", net)
    assert names["layer4.2.conv1"] == ["conv5_block3_1_conv"]
