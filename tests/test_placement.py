"""Placement, decided from the compiler: the cohort size and the evaluation batch shrink until
XLA's memory plan of the real compiled steps fits the memory available, and the caps that bound
a cohort (runs to train, search.parallel, the CPU's last-level cache and its measured speed-up)."""
import logging
import types

import jax
import ml_collections
import numpy as np
import pytest

from blockft_jax import models
from blockft_jax.engine import ahead
from blockft_jax.engine import cohort as cohort_lib
from blockft_jax.engine import placement, train

import test_train as base


@pytest.fixture(scope="module")
def engine():
    module = base.create_model()
    table = models.layer_table(module, (base.SIZE, base.SIZE, 3))
    cfg = ml_collections.ConfigDict({"optimizer": "adam", "learning_rate": 1e-3, "epochs": 1})
    return train.Engine(module, train.make_optimizer(cfg, 10), "block_1", train.data_mesh(),
                        table=table)


@pytest.fixture(scope="module")
def variables(engine):
    return models.variable_shapes(engine.module, (base.SIZE, base.SIZE, 3))


def test_largest_cohort_caps(engine, variables):
    live = placement.live_state_bytes(engine, variables)
    assert live == sum(np.dtype(x.dtype).itemsize * np.prod(x.shape) for x in jax.tree.leaves(
        (engine.live_part(variables["params"]), engine.live_part(variables["batch_stats"]))))
    size = lambda parallel, runs: placement.largest_cohort(engine, variables, parallel, runs)[0]
    assert size(3, 10) == 3 and size(3, 2) == 2 and size(1, 10) == 1
    # As few cohorts as the cap allows, of equal size: no padded run computing in vain.
    assert size(5, 12) == 4 and size(5, 15) == 5 and size(5, 11) == 4 and size(4, 9) == 3
    # parallel=0: as many as the runs, the maximum and (on CPU) the last-level cache allow.
    cache_cap = min(placement.MAX_COHORT, placement.last_level_cache_bytes() // (4 * live))
    assert size(0, 500) == -(-500 // -(-500 // cache_cap))
    assert size(0, 3) == min(3, cache_cap)
    with pytest.raises(ValueError, match="parallel"):
        size(-1, 10)


def test_on_cpu_a_cohort_forms_only_where_it_pays(engine, variables):
    """parallel=0 on CPU: one run at a time where a cohort's measured speed-up per run (the
    caller's `speedup(k)`) is below MIN_CPU_COHORT_SPEEDUP; a set search.parallel is the
    user's cap and is not weighed, nor is a single run."""
    asked = []

    def speedup(gain):
        return lambda k: asked.append(k) or gain

    low, enough = placement.MIN_CPU_COHORT_SPEEDUP - 0.01, placement.MIN_CPU_COHORT_SPEEDUP
    size, caps = placement.largest_cohort(engine, variables, 0, 10, speedup(low))
    assert (size, caps["CPU speed-up"], asked) == (1, 1, [min(10, caps["CPU cache"])])
    size, caps = placement.largest_cohort(engine, variables, 0, 10, speedup(enough))
    assert size == min(10, caps["CPU cache"]) > 1 and "CPU speed-up" not in caps
    asked.clear()
    assert placement.largest_cohort(engine, variables, 3, 10, speedup(low))[0] == 3
    assert placement.largest_cohort(engine, variables, 0, 1, speedup(low))[0] == 1
    assert asked == []


def test_on_cpu_the_speed_up_weighed_is_a_devices_share(engine, variables, monkeypatch):
    """Two devices on the 'runs' axis (one a core): each would vmap half the widest cohort,
    so the speed-up weighed is of that half; below the bar, one run a device, cohorts of 2."""
    live = placement.live_state_bytes(engine, variables)
    monkeypatch.setattr(placement, "live_state_bytes", lambda *_: live)
    two_devices = types.SimpleNamespace(mesh=types.SimpleNamespace(
        shape={"runs": 2, "data": 1}, devices=np.array(jax.local_devices()[:1] * 2)))
    asked = []
    size, caps = placement.largest_cohort(two_devices, variables, 0, 10,
                                          lambda k: asked.append(k) or 1.0)
    assert asked == [-(-min(10, caps["CPU cache"]) // 2)]
    assert (size, caps["CPU speed-up"]) == (2, 1)


def test_a_rungs_runs_in_equal_cohorts_no_larger_than_placed():
    assert placement.balanced_size(24, 11) == 8      # three of 8, not 11 + 11 + 2 padded
    assert placement.balanced_size(8, 11) == 8 and placement.balanced_size(11, 11) == 11
    assert placement.balanced_size(12, 5) == 4 and placement.balanced_size(1, 14) == 1
    assert placement.balanced_size(9, 8, positions=4) == 8   # fills the mesh's runs axis
    assert placement.balanced_size(3, 8, positions=4) == 4


def test_padding_is_cut_on_cpu_only_when_it_outweighs_the_compilation():
    worth = lambda runs, size, epochs, cpu=True: placement.padding_worth_cutting(
        runs, 11, size, epochs, cpu)
    # 24 runs: 33 slots in cohorts of 11, 24 in cohorts of 8 -- 9 padded runs saved an epoch,
    # worth compiling once they amount to PADDING_COHORT_EPOCHS epochs of a cohort of 11.
    enough = -(-placement.PADDING_COHORT_EPOCHS * 11 // 9)
    assert worth(24, 8, epochs=enough) and not worth(24, 8, epochs=enough - 1)
    assert not worth(24, 8, epochs=1000, cpu=False)  # a padded run fills idle lanes there
    assert not worth(22, 11, epochs=1000)            # nothing padded to cut


def test_fit_to_memory_shrinks_the_cohort_then_the_evaluation_batch(caplog):
    compiled = []

    def compile_for(k, multiple):  # 10 MB fixed, 5 MB a run to train, 2 MB x multiple to eval
        compiled.append((k, multiple))
        return {"train": 10 + 5 * k, "eval": 10 + 2 * multiple * k}

    resident = lambda k: k  # a run's best variables beside the programs
    fit = lambda free, size=8: placement.fit_to_memory(compile_for, size, free=free,
                                                        resident=resident, fixed=10, cpu=False)
    assert fit(1000)[:2] == (8, 4)            # fits as compiled: one compilation
    assert compiled == [(8, 4)]
    compiled.clear()
    size, multiple, figures = fit(40)         # 10 + 6k <= 40: k = 5
    assert (size, multiple) == (5, 2) and compiled[0] == (8, 4)
    assert figures["train"] <= 40 and figures["eval"] <= 40
    compiled.clear()
    with caplog.at_level(logging.WARNING):    # one run does not fit: try anyway, and say so
        assert fit(12)[:2] == (1, 1)
    assert "trying anyway" in caplog.text
    assert fit(0)[:2] == (8, 4)               # memory unknown: as compiled


def test_compiled_memory_grows_with_the_cohort(engine, variables):
    """The figures come from XLA's plan of the real steps: more runs, more bytes."""
    from blockft_jax.candidates import groups
    mask = groups.param_mask(variables["params"], engine.table, [])
    bn_modes = groups.bn_modes(engine.table, [])
    memory = {k: ahead.compile_steps(cohort_lib.Cohort(engine, k), variables, mask, bn_modes,
                                     base.BATCH, (base.SIZE, base.SIZE, 3)) for k in (1, 4)}
    assert 0 < memory[1]["train"] < memory[4]["train"]
    assert 0 < memory[1]["eval"] < memory[4]["eval"]
    assert memory[1]["flops"] == pytest.approx(memory[4]["flops"], rel=0.05)


def test_machine_and_free_memory_on_cpu():
    mesh = train.data_mesh()
    m = placement.machine(mesh)
    assert m["devices"] == jax.device_count() and m["memory"] > 0 and m["device"]
    assert 0 < placement.free_memory(mesh) < m["memory"]


def test_device_split_bytes_uint8_images_on_accelerators_only(engine):
    """An engine without a prefix cache keeps its uint8 images in device memory on an
    accelerator (when they fit); on CPU its batches are fed (the same memory)."""
    import types
    assert placement.device_split_bytes(engine, 100, (32, 32, 3)) == 0  # CPU, no cache
    gpu = types.SimpleNamespace(platform="gpu", process_index=jax.process_index())
    accelerated = types.SimpleNamespace(cached=False, mesh=types.SimpleNamespace(
        devices=np.asarray([gpu], dtype=object)))
    assert placement.device_split_bytes(accelerated, 100, (32, 32, 3)) == 100 * 32 * 32 * 3
    cached = types.SimpleNamespace(cached=True, feature_bytes=lambda n: 7 * n)
    assert placement.device_split_bytes(cached, 100, (32, 32, 3)) == 700


def test_the_cpu_budget_does_not_move_with_the_load(monkeypatch):
    """On CPU the cohort's memory budget is a share of the host's memory, all of it: memory
    that another process holds now would otherwise shrink the cohorts, and with them change
    float order and the numbers of the same command."""
    mesh = train.data_mesh()
    idle = placement.free_memory(mesh)
    sysconf = placement.os.sysconf
    busy = lambda name: 1 if name == "SC_AVPHYS_PAGES" else sysconf(name)  # all but taken
    monkeypatch.setattr(placement.os, "sysconf", busy)
    assert placement.free_memory(mesh) == idle
