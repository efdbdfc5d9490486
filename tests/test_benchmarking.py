"""blockft_jax.benchmarking, what scripts/benchmark.py and scripts/gpu_check.py share: the
harness (a worker's tagged result read back; a failure, a silent exit or a hang reported with
the worker's output, never raised) and the job they set up."""
import sys

import jax
import pytest

from blockft_jax import benchmarking as bench
from blockft_jax import models


def launch(code: str, timeout: float = 120.0) -> dict:
    return bench.launch([sys.executable, "-c", code], env=bench.worker_env(), timeout=timeout)


def test_the_workers_result_comes_back():
    r = launch("from blockft_jax import benchmarking as b; print('noise'); "
               "b.report(lambda: {'images_per_s': 3.5})")
    assert r["ok"] and r["images_per_s"] == 3.5
    assert r["peak_rss_mb"] > 0 and r["process_s"] > 0 and "log" not in r


def test_a_failure_comes_back_with_its_traceback():
    r = launch("from blockft_jax import benchmarking as b; b.report(lambda: 1 / 0)")
    assert not r["ok"] and r["error"] == "ZeroDivisionError: division by zero"
    assert "Traceback" in r["log"]


def test_a_worker_without_a_result():
    r = launch("import sys; print('said nothing tagged'); sys.exit(3)")
    assert r == {"ok": False, "error": "the worker exited with status 3 without a result",
                 "log": "said nothing tagged\n", "process_s": r["process_s"]}


def test_a_hung_worker_is_killed_with_its_children():
    # The child keeps the output pipe open: unless the whole process group is killed, reading
    # the worker's output would wait for it.
    r = launch("import subprocess, sys, time; print('started', flush=True); "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
               "time.sleep(120)", timeout=3)
    assert not r["ok"] and r["error"] == "timed out after 3 s" and "started" in r["log"]
    assert r["process_s"] < 60


def test_the_job_trains_the_named_layers_from_their_unit():
    job = bench.setup("mobilenet_v2", "block_16", size=32, width=0.35, cache=True)
    assert job.from_unit == "block_16" and job.cached and job.engine.cached
    assert job.layers == ("block_16_expand", "block_16_expand_BN", "block_16_depthwise",
                          "block_16_depthwise_BN", "block_16_project", "block_16_project_BN")
    assert job.batch_stat_bn == ["block_16_expand_BN", "block_16_depthwise_BN",
                                 "block_16_project_BN"]
    kernels = 56 * 336 + 3 * 3 * 336 + 336 * 112  # block_16's convolutions at width 0.35
    bn = 2 * (336 + 336 + 112)
    head = 1280 * bench.NUM_CLASSES + bench.NUM_CLASSES
    assert job.trainable_params == kernels + bn + head
    # The random variables have the module's own structure, shapes and dtypes.
    shapes = models.variable_shapes(job.module, (32, 32, 3))
    assert jax.tree.structure(job.variables) == jax.tree.structure(dict(shapes))
    assert all(v.shape == s.shape and v.dtype == s.dtype for v, s in
               zip(jax.tree.leaves(job.variables), jax.tree.leaves(dict(shapes))))

    full = bench.setup("mobilenet_v2", "all", size=32, width=0.35, cache=True)
    assert full.from_unit == full.module.unit_names()[0] and not full.cached  # nothing to cache
    with pytest.raises(ValueError, match="No weighted layer of mobilenet_v2 starts with"):
        bench.setup("mobilenet_v2", "block_99", size=32, width=0.35)
