"""The search's schedule (successive halving or the paper's exhaustive protocol) and the split of
candidates into engines by depth: pure rules, checked by hand-counted cases."""
import dataclasses
import json
import time

import numpy as np
import pytest

from blockft_jax import models
from blockft_jax.candidates import halving
from blockft_jax.engine import train
from blockft_jax.search import costs, plan
from configs import demo, tiny


def test_rungs_grow_by_eta_and_end_with_every_seed():
    rungs = halving.rungs("halving", 30, 4, eta=3, halving_seeds=1)
    assert [r.epochs for r in rungs] == [1, 3, 10, 30]
    assert [r.seeds for r in rungs] == [(0,), (0,), (0,), (0, 1, 2, 3)]
    assert [r.final for r in rungs] == [False, False, False, True]
    assert halving.rungs("exhaustive", 30, 4) == [halving.Rung(30, (0, 1, 2, 3), True)]
    # Too few epochs for a rung below them: halving is exhaustive.
    assert halving.rungs("halving", 2, 1, eta=3) == halving.rungs("exhaustive", 2, 1)
    assert [r.epochs for r in halving.rungs("halving", 4, 2, eta=2)] == [1, 2, 4]
    with pytest.raises(ValueError, match="schedule"):
        halving.rungs("greedy", 10, 1)


def test_promote_keeps_the_best_fraction_ties_in_plan_order():
    order = ["a", "b", "c", "d", "e"]
    accuracy = {"a": 0.5, "b": 0.7, "c": 0.5, "d": 0.9, "e": 0.5}
    assert halving.survivors(5, 3) == 2 and halving.survivors(1, 3) == 1
    assert halving.promote(order, accuracy, 3) == ["b", "d"]
    # Ties: the candidate earlier in plan order (nearer the output) goes on.
    assert halving.promote(order, {c: 0.5 for c in order}, 3) == ["a", "b"]
    assert halving.promote(["x"], {"x": 0.0}, 3) == ["x"]


def test_a_strategy_stops_only_where_it_prunes_and_its_expected_work():
    rungs = halving.rungs("halving", 30, 4, eta=3, halving_seeds=1)
    assert halving.stopping_rungs(1, rungs, 3) == [3]        # a baseline: straight to the end
    assert halving.stopping_rungs(3, rungs, 3) == [0, 3]     # 3 -> 1 finalist
    assert halving.stopping_rungs(104, rungs, 3) == [0, 1, 2, 3]
    # 104 candidates: 104 one-epoch runs, 35 go on to 3 epochs, 12 to 10, 4 finalists train 4
    # seeds to 30 (seed 0 from its 10 epochs).
    runs, epochs = halving.expected(104, rungs, 3)
    assert runs == (104 - 35) + (35 - 12) + (12 - 4) + 4 * 4
    assert epochs == 104 * 1 + 35 * 2 + 12 * 7 + 4 * (20 + 3 * 30)
    assert halving.expected(104, halving.rungs("exhaustive", 30, 4), 3) == (416, 416 * 30)


def test_zero_reaches_the_whole_backbone():
    config = tiny.get_config()
    with config.unlocked():
        config.search.max_layers = config.search.max_blocks = config.search.max_windows = 0
    module = plan.build_module(config, 3)
    table = models.layer_table(module, (32, 32, 3))
    searched = plan.make_plan(config, table, module)
    weighted = len([r for r in table if r.has_weights and r.unit != "head"])
    assert len(searched.planned["layerwise"]) == weighted
    assert searched.planned["window"][-1].layers[0] in {r.name for r in table if r.unit in (
        "stem", "block_0")}
    # The deepest engine serves every candidate but full's; full has its own unit.
    assert all(searched.engine_of(g) in searched.engines for g in searched.shared)
    assert searched.engine_of(searched.planned["full"][0]) == searched.first_unit


def test_suffix_flops_grow_towards_the_input():
    config = demo.get_config()
    module = plan.build_module(config, 5)
    table = models.layer_table(module, (32, 32, 3))
    units = module.unit_names()
    suffix = costs.suffix_flops(table, models.variable_shapes(module, (32, 32, 3)), units)
    values = [suffix[u] for u in units]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] > 0
    # The head: a dense layer of 1280 x 5 multiply-adds (x2), and a flop per element of the
    # pooling (and dropout) outputs.
    head = costs.unit_flops(table, models.variable_shapes(module, (32, 32, 3)))["head"]
    assert 2 * 1280 * 5 <= head <= 2 * 1280 * 5 + 2 * 1280


def test_engines_split_by_depth_trades_compile_for_training():
    units = ["stem", "b1", "b2", "b3", "head"]
    suffix = {"stem": 100.0, "b1": 40.0, "b2": 20.0, "b3": 10.0, "head": 1.0}
    work = {"b1": 10.0, "b2": 10.0, "b3": 1000.0}  # images through the engine, per lowest unit
    cheap = costs.Speed(seconds_per_flop=1.0, compile_seconds=1.0, measured_on="test")
    dear = costs.Speed(seconds_per_flop=1.0, compile_seconds=1e9, measured_on="test")
    assert costs.split(work, suffix, units, 4, cheap) == ["b3", "b2", "b1"]
    assert costs.split(work, suffix, units, 1, cheap) == ["b1"]
    assert costs.split(work, suffix, units, 4, dear) == ["b1"]  # compiling outweighs all
    # Two engines: the heavy b3 candidates get their own; b1 and b2 share b1's.
    assert costs.split(work, suffix, units, 2, cheap) == ["b3", "b1"]
    assert np.isfinite(sum(suffix.values()))


def test_the_estimate_counts_auto_rgns_measurement():
    """Auto-RGN's run-epochs also compute a gradient on `auto_rgn_batches` batches (at most an
    epoch's): what the estimate adds over `full`'s, in the same engine, is those steps."""
    def train_seconds(strategy, batches=5):
        config = demo.get_config()
        with config.unlocked():
            config.search.strategies = (strategy,)
            config.search.auto_rgn_batches = batches
            config.search.bn_policies = ("train",)  # one candidate each
        module = plan.build_module(config, 5)
        table = models.layer_table(module, (32, 32, 3))
        searched = plan.make_plan(config, table, module)
        suffix = costs.suffix_flops(table, models.variable_shapes(module, (32, 32, 3)),
                                    module.unit_names())
        speed = costs.Speed(seconds_per_flop=1e-9, compile_seconds=10.0, measured_on="test",
                            step_seconds=0.01)
        epochs = searched.expected(strategy)[1]
        estimate = costs.estimate(searched, suffix, speed, (100, 400), 25, 100)["train"]
        return estimate, epochs, suffix[searched.first_unit]

    full, epochs, suffix = train_seconds("full")
    for batches, measured in ((2, 2), (9, 4)):  # 100 images: 4 batches of 25 an epoch
        auto_rgn, _, _ = train_seconds("auto_rgn", batches)
        np.testing.assert_allclose(auto_rgn - full, epochs * (
            measured * 0.01 + 3 * suffix * 25 * measured * 1e-9), rtol=1e-9)


def test_the_engines_work_holds_auto_rgns_measurement():
    """What --target counts for Auto-RGN's measurement: its runs (every seed, a baseline),
    their epochs (all of them) and its batches an epoch, in the engine that trains it."""
    config = demo.get_config()
    with config.unlocked():
        config.search.strategies = ("full", "auto_rgn")
        config.search.bn_policies = ("train",)  # one candidate each: never pruned
    module = plan.build_module(config, 5)
    searched = plan.make_plan(config, models.layer_table(module, (32, 32, 3)), module)
    work = plan.engine_work(searched)[searched.first_unit]
    assert work["measurements"] == [(config.train.seeds, config.train.epochs,
                                     config.search.auto_rgn_batches)]
    assert work["runs"] == 2 * config.train.seeds


def test_a_cohorts_speedup_is_the_shared_part_of_a_step_paid_once():
    """A run-step costs step_seconds + flops x seconds_per_flop; a cohort of k pays the shared
    part once and the rest k times."""
    speed = costs.Speed(seconds_per_flop=1e-9, compile_seconds=1.0, measured_on="test",
                        step_seconds=0.003, shared_step_seconds=0.002)
    # No flops: 3 ms alone, 2 of them shared: 4 runs in 2 + 4 x 1 ms against 4 x 3 ms.
    assert speed.cohort_speedup(0.0, 4) == pytest.approx(12 / 6)
    # 1e7 flops (10 ms each run's own): 4 x 13 ms against 2 + 4 x 11 ms.
    assert speed.cohort_speedup(1e7, 4) == pytest.approx(52 / 46)
    assert speed.cohort_speedup(1e7, 1) == pytest.approx(1.0)
    unshared = dataclasses.replace(speed, shared_step_seconds=0.0)
    assert unshared.cohort_speedup(0.0, 64) == pytest.approx(1.0)


def _tiny_measurement(**measure_kwargs):
    config = tiny.get_config()
    module = plan.build_module(config, 3)
    table = models.layer_table(module, (32, 32, 3))
    variables = models.init_variables(module, (32, 32, 3))
    tx = train.make_optimizer(config.train, 10)
    searched = plan.make_plan(config, table, module)
    speed = costs.measure(searched, module, table, variables, tx, batch_size=8,
                          image_shape=(32, 32, 3), **measure_kwargs)
    head_step = 3 * 8 * costs.suffix_flops(table, variables, module.unit_names())["head"]
    return speed, head_step


def test_measure_times_one_run_and_a_cohort():
    """The real measurement on the tiny model: one run's step and a cohort's, each compiled and
    timed; what the cohort's runs share lies within one run's step, kept with the speed. (How
    much they share is not asserted: the tiny head's step is a quarter of a millisecond, and
    its cohort of 4 takes 3-4x as long, so the share measures anywhere from 0 to 0.19 ms here.)"""
    speed, head_step = _tiny_measurement(steps=20)
    assert "below unit head" in speed.measured_on and f"of {costs.COHORT_PROBE}" in speed.measured_on
    assert speed.compile_seconds > 0.0 and speed.seconds_per_flop > 0.0
    assert 0.0 <= speed.shared_step_seconds <= speed.seconds(head_step, 1)
    assert speed.to_json()["shared_step_seconds"] == speed.shared_step_seconds


def test_the_shared_part_is_what_a_cohort_adds_less_than_its_runs(monkeypatch):
    """From the timings: one run's step = shared + own, a cohort of k's = shared + k x own.
    With one run at 3 ms and a cohort of 4 at 6 ms, each run's own part is 1 ms and 2 ms are
    shared; a cohort slower than its runs one at a time shares nothing."""
    def timings(one, cohort):
        def fastest(steps_of, steps, rounds=costs.TIMING_ROUNDS):
            assert set(steps_of) == {"forward", 1, costs.COHORT_PROBE} and rounds > 1
            return {"forward": 1e-3, 1: one, costs.COHORT_PROBE: cohort}
        return fastest
    monkeypatch.setattr(costs, "COHORT_PROBE", 4)
    monkeypatch.setattr(costs, "_fastest_step_seconds", timings(0.003, 0.006))
    assert _tiny_measurement()[0].shared_step_seconds == pytest.approx(0.002)
    monkeypatch.setattr(costs, "_fastest_step_seconds", timings(0.003, 0.013))
    assert _tiny_measurement()[0].shared_step_seconds == 0.0


def test_the_fastest_round_counts():
    """A step slowed in one round (a load beside us) is timed by its fastest round, and the
    steps take turns, so that a load slows no step alone."""
    order, delays = [], iter([0.02, 0.0, 0.0, 0.0, 0.02, 0.0])

    def step_named(name):
        def step():
            order.append(name)
            time.sleep(next(delays))
            return np.zeros(())
        return step
    fastest = costs._fastest_step_seconds({"a": (step_named("a"), ()),
                                           "b": (step_named("b"), ())}, steps=1, rounds=3)
    assert order == ["a", "b"] * 3
    assert fastest["a"] < 0.01 and fastest["b"] < 0.01


def test_the_machines_speed_is_measured_once_per_job(tmp_path, monkeypatch):
    """The engines' split follows the measured speed, and the split sets float order: so the
    speed is measured once per machine and job and kept, and the same command beside another
    load (slower timings) splits alike. Another job (another batch) is measured afresh."""
    monkeypatch.setenv("BLOCKFT_JAX_CACHE", str(tmp_path))
    timings = iter([1e-9, 5e-9, 7e-9])  # each measurement slower: a loaded machine
    calls = []

    def measure(*args, batch_size, **kwargs):
        calls.append(batch_size)
        return costs.Speed(seconds_per_flop=next(timings), compile_seconds=10.0,
                           measured_on="test")

    monkeypatch.setattr(costs, "measure", measure)
    config = tiny.get_config()
    module = plan.build_module(config, 3)
    table = models.layer_table(module, (32, 32, 3))
    searched = plan.make_plan(config, table, module)
    once = lambda batch: costs.measure_once(config, searched, module, table, None, None,
                                            batch_size=batch, image_shape=(32, 32, 3))
    first = once(8)
    assert once(8) == first and calls == [8]  # kept: the load does not move it
    assert once(16).seconds_per_flop == 5e-9 and calls == [8, 16]
    (kept,) = [p for p in (tmp_path / "speed").iterdir()
               if costs.Speed(**json.loads(p.read_text())) == first]
    kept.unlink()  # deleted: measured again
    assert once(8).seconds_per_flop == 7e-9 and calls == [8, 16, 8]
