"""Candidate-parallel training (blockft_jax.cohort): K runs vmapped give what train.fit gives
each run alone, with one compilation per engine, shared frozen variables left bitwise
unchanged, padding and diverging runs that disturb nobody, and checkpoint/resume per run.

Float order: the vmapped step batches the live layers' matmuls over the run axis (a batched
dot instead of K plain ones) and reduces BN statistics over a batched array; XLA:CPU may sum
in another order there, so losses and parameters agree to float32 rounding (~1e-7 relative
here), not bitwise. Accuracies and best epochs agree exactly."""
import concurrent.futures
import copy

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from blockft_jax import cohort as cohort_lib
from blockft_jax import groups, models, train
from blockft_jax.models import HEAD_UNIT

import test_train as base

BATCH = 8
EPOCHS = 3
FROM_UNIT = "block_1"
# Mixed strategies: classifier only, one conv layer, one BN layer, a two-layer group.
CANDIDATES = ((), ("block_2_project",), ("block_1_depthwise_BN",), base.CANDIDATE)
SEEDS = (0, 1)
# Two cohorts of four, each with every candidate and both seeds.
RUNS = [(layers, (i + j) % 2) for j in SEEDS for i, layers in enumerate(CANDIDATES)]


@pytest.fixture(scope="module")
def model():
    return base.create_model()


@pytest.fixture(scope="module")
def table(model):
    return models.layer_table(model, (base.SIZE, base.SIZE, 3))


@pytest.fixture(scope="module")
def variables(model):
    """Random weights, and moving statistics unlike any batch's (as test_train's)."""
    v = jax.device_get(jax.jit(model.init)(jax.random.key(0),
                                           jnp.zeros((1, base.SIZE, base.SIZE, 3))))
    rng = np.random.default_rng(1)
    for stats in v["batch_stats"].values():
        stats["mean"] = rng.normal(0.0, 0.2, stats["mean"].shape).astype(np.float32)
        stats["var"] = rng.uniform(0.5, 2.0, stats["var"].shape).astype(np.float32)
    return v


@pytest.fixture(scope="module")
def engine(model, table):
    cfg = ml_collections.ConfigDict({"optimizer": "adam", "learning_rate": 1e-2,
                                     "epochs": EPOCHS})
    return train.Engine(model, train.make_optimizer(cfg, EPOCHS * 3), FROM_UNIT,
                        train.data_mesh(), cached=True, table=table)


@pytest.fixture(scope="module")
def host_splits(engine, variables):
    """The prefix cache of three small splits (24 train images: three steps an epoch; 10 for
    validation and test: a padded last batch)."""
    return {name: engine.features(variables, base.synthetic_split(n, seed), BATCH)
            for name, n, seed in (("train", 24, 0), ("validation", 10, 1), ("test", 10, 2))}


@pytest.fixture(scope="module")
def splits(engine, host_splits):
    return {name: engine.to_device(split) for name, split in host_splits.items()}


@pytest.fixture(scope="module")
def cohort(engine):
    return cohort_lib.Cohort(engine, 4)


def start_variables(model, variables, seed):
    """The backbone with a head drawn from `seed` (as the search starts each seed's runs)."""
    head = models.init_head(model, (base.SIZE, base.SIZE, 3),
                            jax.random.fold_in(jax.random.key(seed), 1))
    return {**variables, "params": {**variables["params"], HEAD_UNIT: head}}


@pytest.fixture(scope="module")
def starts(model, variables):
    return {seed: start_variables(model, variables, seed) for seed in SEEDS}


def make_run(starts, table, layers, seed, resume=None):
    return cohort_lib.Run(*base.candidate(starts[seed], table, layers), seed, resume,
                          variables=starts[seed])


def fit_alone(engine, starts, table, splits, layers, seed, **resume):
    run = make_run(starts, table, layers, seed)
    return train.fit(engine, starts[seed], run.mask, run.bn_modes, splits["train"],
                     splits["validation"], splits["test"], epochs=EPOCHS, batch_size=BATCH,
                     seed=seed, **resume)


@pytest.fixture(scope="module")
def reference(engine, starts, table, splits):
    """train.fit of every run, one at a time, each from its seed's head."""
    return {(layers, seed): fit_alone(engine, starts, table, splits, layers, seed)
            for layers, seed in RUNS}


def assert_same_result(got: train.FitResult, want: train.FitResult, variables, live):
    assert (got.status, got.epochs, got.best_epoch, got.steps) == \
        (want.status, want.epochs, want.best_epoch, want.steps)
    assert got.val_accuracy == want.val_accuracy
    assert got.test_accuracy == want.test_accuracy
    assert got.final_val_accuracy == want.final_val_accuracy
    for split in ("validation", "test"):  # every example's class at the best epoch
        np.testing.assert_array_equal(got.predictions[split], want.predictions[split])
    assert len(got.history) == len(want.history)
    for g, w in zip(got.history, want.history):
        assert g.keys() == w.keys()
        for key in ("epoch", "step", "train_accuracy", "val_accuracy", "test_accuracy"):
            assert g.get(key) == w.get(key), key
        np.testing.assert_allclose([g["train_loss"], g["val_loss"]],
                                   [w["train_loss"], w["val_loss"]], rtol=1e-5)
    base.assert_close_states(got.final_variables, want.final_variables)
    base.assert_close_states(got.best_variables, want.best_variables)
    # The frozen layers' variables come out bitwise as they went in.
    for collection in ("params", "batch_stats"):
        start, best = base.flat(variables[collection]), base.flat(got.best_variables[collection])
        assert start.keys() == best.keys()
        for path, value in start.items():
            if path[0] not in live:
                assert np.array_equal(best[path], value), path


def check(results, runs, reference, variables, engine):
    assert len(results) == len(runs)
    for result, (layers, seed) in zip(results, runs):
        assert_same_result(result, reference[(layers, seed)], variables, engine.live)


# --- the cohort trains each run as train.fit does -----------------------------------------------

def test_first_steps_match_one_run_at_a_time(cohort, engine, variables, table, splits, starts):
    """Per-step losses of four vmapped runs against the engine's own step, run by run."""
    runs = [make_run(starts, table, layers, seed) for layers, seed in RUNS[:4]]
    state = cohort.init(variables, [r.variables for r in runs])
    masks, bn_modes, rngs = cohort.stack_inputs(runs)
    train_split = splits["train"]
    orders = [engine.device_order(train_split, BATCH, np.random.default_rng([r.seed, 0]))
              for r in runs]
    stacked = engine.place(jax.tree.map(lambda *xs: np.stack(jax.device_get(xs)), *orders))
    active = engine.replicate(np.ones(4, bool))
    losses, runs_state = [], state.runs
    for _ in range(3):
        runs_state, metrics = cohort.train_step_gathered(
            state.shared, runs_state, masks, bn_modes, train_split.images, train_split.labels,
            *stacked, rngs, active)
        losses.append(jax.device_get(metrics["loss"]))
    for i, run in enumerate(runs):
        single = engine.init_state(run.variables)
        mask, bn, rng = engine.place((run.mask, run.bn_modes, jax.random.key(run.seed)))
        for step in range(3):
            single, metrics = engine.train_step_gathered(
                single, mask, bn, train_split.images, train_split.labels, *orders[i], rng)
            np.testing.assert_allclose(losses[step][i], float(metrics["loss"]), rtol=1e-5)
        got = cohort.run_state(cohort_lib.CohortState(state.shared, runs_state), i)
        base.assert_close_states(got, single)
    assert cohort.compilations["train"] == 1


def test_two_cohorts_match_fit_with_one_compilation(cohort, engine, variables, table, splits,
                                                    reference, starts):
    shared_before = jax.device_get(cohort.shared_part(variables))
    for runs in (RUNS[:4], RUNS[4:]):
        results = cohort_lib.fit_cohort(
            cohort, variables, [make_run(starts, table, *r) for r in runs], splits["train"],
            splits["validation"], splits["test"], epochs=EPOCHS, batch_size=BATCH)
        check(results, runs, reference, variables, engine)
    assert cohort.compilations == {"train": 1, "eval": 1}
    # The cohort's steps did not count as the engine's own (train.fit's) compilations.
    assert engine.compilations["train"] == 1
    np.testing.assert_equal(jax.device_get(cohort.shared_part(variables)), shared_before)
    # Frozen layers are held once, not per run: the stacked state has only live layers.
    state = cohort.init(variables)
    assert set(state.runs["params"]) == set(engine.live) & set(variables["params"])
    assert set(state.shared["params"]).isdisjoint(engine.live)
    assert all(x.shape[0] == 4 for x in jax.tree.leaves(state.runs))


def test_padded_last_cohort(cohort, engine, variables, table, splits, reference, starts):
    runs = RUNS[1:4]
    results = cohort_lib.fit_cohort(
        cohort, variables, [make_run(starts, table, *r) for r in runs], splits["train"],
        splits["validation"], splits["test"], epochs=EPOCHS, batch_size=BATCH)
    check(results, runs, reference, variables, engine)
    assert cohort.compilations["train"] == 1


@pytest.fixture(scope="module")
def fed_cohort(engine):
    return cohort_lib.Cohort(engine, 4)


def test_host_fed_splits(fed_cohort, engine, variables, table, host_splits, reference, starts):
    """The fed path (host cache, batches of every run's own order sent per step)."""
    fed = fed_cohort
    results = cohort_lib.fit_cohort(
        fed, variables, [make_run(starts, table, *r) for r in RUNS[4:]], host_splits["train"],
        host_splits["validation"], host_splits["test"], epochs=EPOCHS, batch_size=BATCH)
    check(results, RUNS[4:], reference, variables, engine)
    assert fed.compilations == {"train": 1, "eval": 1}


def test_a_diverging_run_disturbs_no_other(cohort, engine, variables, table, splits,
                                           reference, starts):
    """Run 2 starts from a state with a NaN in its head (as a run blown up by its learning
    rate would be): it stops after its first epoch, the others train on as if alone."""
    nan_state = jax.tree.map(np.array, jax.device_get(engine.init_state(starts[RUNS[2][1]])))
    nan_state["params"][HEAD_UNIT]["kernel"][0, 0] = np.nan
    runs = [make_run(starts, table, *r) for r in RUNS[:4]]
    runs[2].resume = {"state": engine.place(nan_state)}
    lengths = []
    results = cohort_lib.fit_cohort(
        cohort, variables, runs, splits["train"], splits["validation"], splits["test"],
        epochs=EPOCHS, batch_size=BATCH,
        on_epoch_end=lambda epoch, state, histories, best: lengths.append(
            [len(h) for h in histories]))
    check([results[i] for i in (0, 1, 3)], [RUNS[i] for i in (0, 1, 3)], reference, variables,
          engine)
    diverged = results[2]
    assert diverged.status == "diverged" and diverged.epochs == 1
    assert not np.isfinite(diverged.history[0]["train_loss"])
    assert diverged.best_variables is None and diverged.best_epoch == 0
    assert lengths == [[1, 1, 1, 1], [2, 2, 1, 2], [3, 3, 1, 3]]
    # As train.fit on the same start: and its state stopped changing after that epoch.
    alone = fit_alone(engine, starts, table, splits, *RUNS[2],
                      state=engine.place(nan_state))
    assert alone.status == "diverged" and alone.epochs == 1
    for got, want in zip(jax.tree.leaves(diverged.final_variables),
                         jax.tree.leaves(alone.final_variables)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert diverged.steps == alone.steps == 3


def test_checkpoint_and_resume(cohort, engine, variables, table, splits, reference, starts):
    """Each run's state taken out after an epoch (as a checkpoint would store it) and given
    back as its resume: the cohort finishes as if never interrupted -- also when resumed after
    the last epoch, where the best epoch's predictions come from its saved variables."""
    saved = {}

    def on_epoch_end(epoch, state, histories, best_variables):
        for i in range(len(histories)):
            saved[epoch, i] = {"state": jax.device_get(cohort.run_state(state, i)),
                               "start_epoch": epoch, "history": copy.deepcopy(histories[i]),
                               "best_variables": best_variables[i]}

    runs = RUNS[4:]
    uninterrupted = cohort_lib.fit_cohort(
        cohort, variables, [make_run(starts, table, *r) for r in runs], splits["train"],
        splits["validation"], splits["test"], epochs=EPOCHS, batch_size=BATCH,
        on_epoch_end=on_epoch_end)
    # A run's state is a plain Engine state: what checkpoint.Checkpoint saves and restores.
    template = engine.init_state(variables)
    assert jax.tree.structure(saved[1, 0]["state"]) == jax.tree.structure(template)
    for epoch in (1, EPOCHS):
        resumed = [make_run(starts, table, *r, resume=saved[epoch, i])
                   for i, r in enumerate(runs)]
        results = cohort_lib.fit_cohort(cohort, variables, resumed, splits["train"],
                                        splits["validation"], splits["test"], epochs=EPOCHS,
                                        batch_size=BATCH)
        check(results, runs, reference, variables, engine)
        for got, want in zip(results, uninterrupted):  # and bitwise as the cohort itself
            assert_same_bits(got, want)
    assert cohort.compilations["train"] == 1


@pytest.mark.parametrize("path", ["device_cache", "fed_cached"])
def test_train_loop_copies_no_host_data_quietly(request, path, variables, table, splits,
                                                host_splits, starts):
    """Under jax.transfer_guard('disallow') a cohort's epochs and evaluation run: every
    transfer (orders, batches, flags, indices) is an explicit placement."""
    cohort = request.getfixturevalue("cohort" if path == "device_cache" else "fed_cohort")
    inputs = splits if path == "device_cache" else host_splits
    runs = [make_run(starts, table, *r) for r in RUNS[:4]]
    state = cohort.init(variables, [r.variables for r in runs])
    masks, bn_modes, rngs = cohort.stack_inputs(runs)
    with jax.transfer_guard("disallow"):
        for epoch in range(2):
            state, losses, _, _ = cohort_lib.train_epoch(
                cohort, state, masks, bn_modes, inputs["train"], BATCH, [r.seed for r in runs],
                epoch, rngs, [True] * 4)
        evaluated = cohort_lib.evaluate(cohort, state, inputs["validation"], BATCH)
    assert np.all(np.isfinite(losses))
    assert all(e["predicted"].shape == (len(inputs["validation"]),) for e in evaluated)


def assert_same_bits(got: train.FitResult, want: train.FitResult):
    assert got.history == want.history
    for a, b in zip(jax.tree.leaves(jax.device_get((got.final_variables, got.best_variables))),
                    jax.tree.leaves(jax.device_get((want.final_variables,
                                                    want.best_variables)))):
        assert np.array_equal(a, b)


def test_a_run_does_not_depend_on_its_slot_or_cohort_mates(cohort, variables, table, splits,
                                                          starts):
    """Bitwise: a run's arithmetic is its own whatever runs share its cohort and wherever it
    sits, so a resumed search may regroup runs."""
    def fit(runs):
        return cohort_lib.fit_cohort(cohort, variables, [make_run(starts, table, *r) for r in runs],
                                     splits["train"], splits["validation"], splits["test"],
                                     epochs=2, batch_size=BATCH)

    first = fit(RUNS[:4])
    regrouped = fit([RUNS[5], RUNS[2], RUNS[0], RUNS[7]])
    assert_same_bits(regrouped[2], first[0])
    assert_same_bits(regrouped[1], first[2])


def test_steps_compiled_ahead_on_a_thread_are_reused(engine, variables, table, splits):
    ahead = cohort_lib.Cohort(engine, 4)  # padded: two real runs
    sizes = {name: len(split) for name, split in splits.items()}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(ahead.compile_steps, variables, *base.candidate(variables, table, ()),
                    BATCH, (base.SIZE, base.SIZE, 3), sizes).result()
    assert ahead.compilations == {"train": 1, "eval": 1}
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(str(kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        results = cohort_lib.fit_cohort(
            ahead, variables, [(*base.candidate(variables, table, layers), seed)
                               for layers, seed in RUNS[:2]],
            splits["train"], splits["validation"], splits["test"], epochs=1, batch_size=BATCH)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert [r.status for r in results] == ["ok", "ok"]
    assert ahead.compilations == {"train": 1, "eval": 1}
    assert not [name for name in compiled if name.endswith(("_fn", "<lambda>"))], compiled


# --- the cohort size rule ----------------------------------------------------------------------

def test_cohort_size_rule(engine, variables, table):
    per_run = cohort_lib.run_bytes(engine, variables, BATCH)
    live = sum(x.nbytes for x in jax.tree.leaves(
        (engine._live(variables["params"]), engine._live(variables["batch_stats"]))))
    names = engine.module.unit_names()
    activations = sum(np.prod(r.output_shape[1:]) for r in table
                      if names.index(r.unit) >= names.index(FROM_UNIT))
    assert per_run == 4 * live + 3 * 4 * BATCH * activations
    size = lambda parallel, runs, budget=None: cohort_lib.cohort_size(
        engine, variables, parallel, runs, batch_size=BATCH, budget_bytes=budget)
    assert size(3, 10) == 3 and size(3, 2) == 2 and size(1, 10) == 1
    assert size(0, 10, budget=int(2.5 * per_run)) == 2
    assert size(0, 10, budget=per_run // 2) == 1     # never less than one run
    assert size(0, 10, budget=1000 * per_run) == 10  # no more than the runs left
    # On CPU, no more than the runs whose live state (x4) fits in the last-level cache.
    cache_cap = cohort_lib.last_level_cache_bytes() // (4 * live)
    assert size(0, 500, budget=1000 * per_run) == min(cohort_lib.MAX_COHORT, cache_cap)
    assert size(0, 500) >= 1                         # CPU: a share of the host's memory
    with pytest.raises(ValueError, match="parallel"):
        size(-1, 10)


def test_runs_share_the_frozen_layers(cohort, variables, starts):
    """A run may start from its own live layers (its seed's head), never its own frozen ones:
    those are held once for the whole cohort."""
    assert "Conv1" not in cohort.engine.live
    own = {**starts[0], "params": {**starts[0]["params"], "Conv1": jax.tree.map(
        lambda x: x + 1.0, starts[0]["params"]["Conv1"])}}
    with pytest.raises(ValueError, match="params/Conv1"):
        cohort.init(variables, [own] + [None] * 3)
