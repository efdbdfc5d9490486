"""The training loop (blockft_jax.engine.cohort): K runs vmapped give what a cohort of one
gives each run alone, with one compilation per engine, shared frozen variables left bitwise
unchanged, padding and diverging runs that disturb nobody, the best epoch's variables kept on
the device, and checkpoint/resume per run.

Float order: the vmapped step batches the live layers' matmuls over the run axis (a batched
dot instead of K plain ones) and reduces BN statistics over a batched array; XLA:CPU may sum
in another order there, so losses and parameters agree to float32 rounding (~1e-7 relative
here), not bitwise. Accuracies and best epochs agree exactly."""
import concurrent.futures
import copy
import dataclasses
import json

import jax
import ml_collections
import numpy as np
import pytest

from blockft_jax import models
from blockft_jax.candidates import groups, settings, strategies
from blockft_jax.common import streams
from blockft_jax.engine import checkpoint
from blockft_jax.engine import cohort as cohort_lib
from blockft_jax.engine.ahead import compile_steps
from blockft_jax.engine import train
from blockft_jax.inputs import data
from blockft_jax.models import HEAD_UNIT

import test_train as base

BATCH = 8
EPOCHS = 3
LEARNING_RATE = 1e-2
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
    return base.pretrained_like(model)


@pytest.fixture(scope="module")
def engine(model, table):
    cfg = ml_collections.ConfigDict({"optimizer": "adam", "learning_rate": LEARNING_RATE,
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


@pytest.fixture(scope="module")
def single(engine):
    """A cohort of one: one run at a time."""
    return cohort_lib.Cohort(engine, 1)


def start_variables(model, variables, seed):
    """The backbone with a head drawn from `seed` (as the search starts each seed's runs)."""
    head = models.init_head(model, (base.SIZE, base.SIZE, 3), streams.head_key(seed))
    return {**variables, "params": {**variables["params"], HEAD_UNIT: head}}


@pytest.fixture(scope="module")
def starts(model, variables):
    return {seed: start_variables(model, variables, seed) for seed in SEEDS}


def make_run(starts, table, layers, seed, resume=None):
    return cohort_lib.Run(*base.candidate(starts[seed], table, layers), seed,
                          variables=starts[seed], resume=resume)


def fit(cohort, variables, runs, splits, epochs=EPOCHS, **kwargs):
    return cohort_lib.fit(cohort, variables, runs, splits["train"], splits["validation"],
                          splits["test"], epochs=epochs, batch_size=BATCH, **kwargs)


@pytest.fixture(scope="module")
def reference(single, variables, starts, table, splits):
    """Every run alone (a cohort of one), one at a time, each from its seed's head."""
    return {(layers, seed): fit(single, variables, [make_run(starts, table, layers, seed)],
                                splits)[0]
            for layers, seed in RUNS}


# Adam moves a parameter by up to about its rate each step whatever the gradient's size, so
# where a gradient nearly cancels, float order (the cohort's batched reductions against one
# run's, or another CPU's) can move it by a share of a step, not of its value. Seen: 1.1% of a
# step on an AMD EPYC (the factor-10 setting's 0.1 steps). A wrong setting, slot or rate moves
# parameters by whole steps.
STEP_SHARE = 0.05


def assert_same_result(got: cohort_lib.FitResult, want: cohort_lib.FitResult, variables, live,
                       step: float | None = None):
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
    # Runs by Adam steps of at most `step`: within a share of one.
    atol = 1e-5 if step is None else 1e-5 + STEP_SHARE * step
    base.assert_close_states(got.final_variables, want.final_variables, atol=atol)
    base.assert_close_states(got.best_variables, want.best_variables, atol=atol)
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


# --- the cohort trains each run as it trains alone ----------------------------------------------

def test_first_steps_match_one_run_at_a_time(cohort, single, engine, variables, table, splits,
                                            starts):
    """Per-step losses of four vmapped runs against each run alone (a cohort of one), over
    one epoch (three steps) in the epoch's one program."""
    train_split = splits["train"]

    def steps(c, runs):
        state = c.init(variables, runs)
        masks, bn_modes, keys = c.stack_inputs(runs)
        orders, weights = zip(*[data.batch_order(len(train_split), BATCH,
                                                 shuffle_rng=streams.batch_order(r.seed, 0))
                                for r in runs])
        placed = c.place_runs((np.stack(orders), np.stack(weights)))
        active = c.place_runs(np.ones(len(runs), bool))
        runs_state, metrics = c.train_epoch_gathered(
            state.shared, state.runs, masks, bn_modes, train_split.images, train_split.labels,
            *placed, keys, active)
        losses = jax.device_get(metrics["loss"]).T  # (steps, runs)
        assert losses.shape == (3, len(runs))
        return losses, jax.device_get(cohort_lib.live(runs_state))

    runs = [make_run(starts, table, layers, seed) for layers, seed in RUNS[:4]]
    together, state = steps(cohort, runs)
    for i, run in enumerate(runs):
        alone, one = steps(single, [run])
        np.testing.assert_allclose(together[:, i], alone[:, 0], rtol=1e-5)
        base.assert_close_states(jax.tree.map(lambda x: x[i], state),
                                 jax.tree.map(lambda x: x[0], one))
    assert cohort.compilations["train"] == 1


def test_an_epoch_program_is_its_step_batch_by_batch(engine, variables, table, splits, starts):
    """An epoch in one program (the step scanned over the epoch's batches) and an evaluation
    in one program give what the step gives called once a batch from the host: the same
    batches in the same order, so the same counts and classes, and losses and states to float
    order (bitwise here on the Xeon this was written on, but XLA may compile a loop's body
    otherwise: the demo's block_8 engine moved two of 158 rows)."""
    cohort = cohort_lib.Cohort(engine, 4)  # its own: the shared one counts its compilations
    train_split, validation = splits["train"], splits["validation"]
    runs = [make_run(starts, table, layers, seed) for layers, seed in RUNS[:4]]
    masks, bn_modes, keys = cohort.stack_inputs(runs)
    orders, weights = cohort_lib.epoch_orders(len(train_split), BATCH, [r.seed for r in runs], 0)
    placed = cohort.place_runs((orders, weights))
    active = cohort.place_runs(np.ones(len(runs), bool))
    args = lambda state: (state.shared, state.runs, masks, bn_modes, train_split.images,
                          train_split.labels, *placed, keys, active)

    state = cohort.init(variables, runs)
    by_program, metrics = cohort.train_epoch_gathered(*args(state))
    step = jax.jit(cohort.steps.train_step_gathered)
    state, stepwise = cohort.init(variables, runs), []
    for _ in range(orders.shape[1]):
        runs_state, step_metrics = step(*args(state))
        state = dataclasses.replace(state, runs=runs_state)
        stepwise.append(step_metrics)
    by_step = state.runs
    assert jax.tree.structure(by_program) == jax.tree.structure(by_step)
    np.testing.assert_array_equal(by_program["step"], by_step["step"])
    base.assert_close_states(jax.device_get(cohort_lib.live(by_program)),
                             jax.device_get(cohort_lib.live(by_step)))
    stacked = lambda key: np.stack([np.asarray(m[key]) for m in stepwise], 1)
    np.testing.assert_array_equal(metrics["count"], stacked("count"))
    np.testing.assert_array_equal(metrics["correct"], stacked("correct"))
    np.testing.assert_allclose(metrics["loss"], stacked("loss"), rtol=1e-5)

    live = cohort_lib.live(by_program)
    order, w = data.batch_order(len(validation), BATCH, shuffle_rng=None)
    order, w = cohort.engine.replicate(order), cohort.engine.replicate(w)
    outs = cohort.evaluate_gathered(state.shared, live, validation.images, validation.labels,
                                    order, w)
    eval_step = jax.jit(cohort.steps.eval_step_gathered)
    for b in range(order.shape[0]):
        want = eval_step(state.shared, live, validation.images, validation.labels, order, w,
                         np.int32(b))
        for key in ("count", "correct", "predicted"):
            np.testing.assert_array_equal(np.asarray(outs[key])[:, b], np.asarray(want[key]))
        np.testing.assert_allclose(np.asarray(outs["loss_sum"])[:, b], want["loss_sum"],
                                   rtol=1e-5)


def test_two_cohorts_match_one_at_a_time_with_one_compilation(cohort, engine, variables, table,
                                                              splits, reference, starts):
    shared_before = jax.device_get(cohort.shared_part(variables))
    for runs in (RUNS[:4], RUNS[4:]):
        results = fit(cohort, variables, [make_run(starts, table, *r) for r in runs], splits)
        check(results, runs, reference, variables, engine)
    assert cohort.compilations == {"train": 1, "eval": 1, "norms": 0}
    np.testing.assert_equal(jax.device_get(cohort.shared_part(variables)), shared_before)
    # Frozen layers are held once, not per run: the stacked state has only live layers.
    state = cohort.init(variables, [make_run(starts, table, *r) for r in RUNS[:4]])
    assert set(state.runs["params"]) == set(engine.live) & set(variables["params"])
    assert set(state.shared["params"]).isdisjoint(engine.live)
    assert all(x.shape[0] == 4 for x in jax.tree.leaves((state.runs, state.best)))


def test_best_variables_are_the_best_epochs(single, variables, table, splits, reference, starts):
    """The best epoch's variables (kept on the device, fetched once at the end) are the
    variables a run trained for exactly that many epochs ends with."""
    (layers, seed), result = next((key, r) for key, r in reference.items()
                                  if 0 < r.best_epoch < EPOCHS)
    shorter = fit(single, variables, [make_run(starts, table, layers, seed)], splits,
                  epochs=result.best_epoch)[0]
    got, want = base.flat(result.best_variables), base.flat(jax.device_get(
        shorter.final_variables))
    assert got.keys() == want.keys()
    for path, value in want.items():
        assert np.array_equal(got[path], value), path


def test_one_fetch_of_metrics_per_epoch(cohort, variables, table, splits, starts, monkeypatch):
    """Per epoch the host fetches the train metrics and the validation results, nothing else
    (no copy of the runs' variables when one improves); the best variables come to the host
    once, at the end."""
    fetches = []
    original = jax.device_get

    def counting(tree):
        fetches.append(len(jax.tree.leaves(tree)))
        return original(tree)

    monkeypatch.setattr(cohort_lib.jax, "device_get", counting)
    at_epoch_end = []
    fit(cohort, variables, [make_run(starts, table, *r) for r in RUNS[:4]], splits,
        on_epoch_end=lambda epoch, state, histories: at_epoch_end.append(len(fetches)))
    assert np.diff(at_epoch_end).tolist() == [2] * (EPOCHS - 1), at_epoch_end
    # After the loop: the test split's evaluation and the best variables.
    assert len(fetches) - at_epoch_end[-1] == 2, fetches


def test_padded_last_cohort(cohort, engine, variables, table, splits, reference, starts):
    runs = RUNS[1:4]
    results = fit(cohort, variables, [make_run(starts, table, *r) for r in runs], splits)
    check(results, runs, reference, variables, engine)
    assert cohort.compilations["train"] == 1


@pytest.fixture(scope="module")
def fed_cohort(engine):
    return cohort_lib.Cohort(engine, 4)


def test_host_fed_splits(fed_cohort, engine, variables, table, host_splits, reference, starts):
    """The fed path (host cache, batches of every run's own order sent per step)."""
    fed = fed_cohort
    results = fit(fed, variables, [make_run(starts, table, *r) for r in RUNS[4:]], host_splits)
    check(results, RUNS[4:], reference, variables, engine)
    assert fed.compilations == {"train": 1, "eval": 1, "norms": 0}


def test_a_diverging_run_disturbs_no_other(cohort, single, engine, variables, table, splits,
                                           reference, starts):
    """Run 2 starts with a NaN in its head (as a run blown up by its learning rate would be):
    it stops after its first epoch, the others train on as if alone."""
    runs = [make_run(starts, table, *r) for r in RUNS[:4]]
    poisoned = jax.tree.map(np.array, jax.device_get(runs[2].variables))
    poisoned["params"][HEAD_UNIT]["kernel"][0, 0] = np.nan
    runs[2].variables = poisoned
    lengths = []
    results = fit(cohort, variables, runs, splits, on_epoch_end=lambda epoch, state, histories:
                  lengths.append([len(h) for h in histories]))
    check([results[i] for i in (0, 1, 3)], [RUNS[i] for i in (0, 1, 3)], reference, variables,
          engine)
    diverged = results[2]
    assert diverged.status == "diverged" and diverged.epochs == 1
    assert not np.isfinite(diverged.history[0]["train_loss"])
    assert diverged.best_variables is None and diverged.best_epoch == 0
    assert diverged.test_accuracy is None and diverged.predictions is None
    assert lengths == [[1, 1, 1, 1], [2, 2, 1, 2], [3, 3, 1, 3]]
    # As alone on the same start: and its state stopped changing after that epoch.
    alone = fit(single, variables, [dataclasses.replace(runs[2])], splits)[0]
    assert alone.status == "diverged" and alone.epochs == 1
    for got, want in zip(jax.tree.leaves(diverged.final_variables),
                         jax.tree.leaves(alone.final_variables)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert diverged.steps == alone.steps == 3


def test_checkpoint_and_resume(cohort, engine, variables, table, splits, reference, starts):
    """Each run's state and best variables taken out after an epoch (as a checkpoint stores
    them) and given back as its resume: the cohort finishes as if never interrupted -- also
    when resumed after the last epoch, where the best epoch's predictions come from its saved
    variables -- and a run that had diverged stays diverged."""
    saved = {}

    def on_epoch_end(epoch, state, histories):
        runs, best = jax.device_get((state.runs, state.best))
        for i in range(len(histories)):
            take = lambda tree: jax.tree.map(lambda x: np.array(x[i]), tree)
            saved[epoch, i] = {"state": take(runs), "best": take(best),
                               "history": copy.deepcopy(histories[i])}

    runs = RUNS[4:]
    uninterrupted = fit(cohort, variables, [make_run(starts, table, *r) for r in runs], splits,
                        on_epoch_end=on_epoch_end)
    for epoch in (1, EPOCHS):
        resumed = [make_run(starts, table, *r, resume=saved[epoch, i])
                   for i, r in enumerate(runs)]
        results = fit(cohort, variables, resumed, splits)
        check(results, runs, reference, variables, engine)
        for got, want in zip(results, uninterrupted):  # and bitwise as the cohort itself
            assert_same_bits(got, want)
    # A run resumed with a diverged epoch in its history stays diverged; its best epoch is
    # the best finite one, however its diverged epoch validated.
    history = copy.deepcopy(saved[2, 0]["history"])
    history[-1].update(train_loss=float("nan"), val_accuracy=1.0)
    resumed = fit(cohort, variables, [make_run(starts, table, *runs[0], resume={
        **saved[2, 0], "history": history})], splits)[0]
    assert (resumed.status, resumed.epochs, resumed.best_epoch) == ("diverged", 2, 1)
    assert resumed.val_accuracy == history[0]["val_accuracy"]
    assert cohort.compilations["train"] == 1


def test_checkpoint_of_runs_at_different_epochs(cohort, variables, table, splits, starts,
                                                tmp_path):
    """A run that joins a cohort ahead of the others (parked at a rung of a halving search),
    saved by checkpoint.Checkpoint after the cohort's first epoch and restored: its history
    and state are where it stood, not cut at the cohort's epoch, and the cohort finishes
    bitwise as if never interrupted. A save killed before it was whole is passed over; a save
    holding none of a cohort's runs is not restored."""
    runs = RUNS[4:]
    keys = [(str(layers), seed) for layers, seed in runs]
    ahead = fit(cohort, variables, [make_run(starts, table, *runs[0])], splits, epochs=2,
                keep_state=True)[0].stopped
    members = lambda resumes: [make_run(starts, table, *r, resume=resumes.get(key))
                               for r, key in zip(runs, keys)]
    whole = fit(cohort, variables, members({keys[0]: ahead}), splits)
    ckpt = checkpoint.Checkpoint(tmp_path / "current", keys, cohort)

    def killed_after_first_epoch(epoch, state, histories):
        ckpt.save(state, histories, epoch)
        ckpt.ckptr.wait_until_finished()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cohort, variables, members({keys[0]: ahead}), splits,
            on_epoch_end=killed_after_first_epoch)
    # A later save killed while orbax wrote its arrays: its record is written first, its
    # folder is still orbax's temporary one. Not whole: the whole save before it is restored.
    record = json.loads((tmp_path / "current" / "save1.json").read_text())
    (tmp_path / "current" / "save2.json").write_text(json.dumps({**record, "epoch": 2}))
    (tmp_path / "current" / "save2.orbax-checkpoint-tmp").mkdir()
    restored = checkpoint.Checkpoint(tmp_path / "current", keys, cohort).restore(variables)
    assert [len(restored[key]["history"]) for key in keys] == [2, 1, 1, 1]
    for got, want in zip(fit(cohort, variables, members(restored), splits), whole):
        assert_same_bits(got, want)
    stale = checkpoint.Checkpoint(tmp_path / "current", [("another", 0)], cohort)
    assert stale.restore(variables) == {}


@pytest.mark.parametrize("path", ["device_cache", "fed_cached"])
def test_train_loop_copies_no_host_data_quietly(request, path, variables, table, splits,
                                                host_splits, starts):
    """Under jax.transfer_guard('disallow') a cohort's epochs and evaluation run: every
    transfer (orders, batches, flags, indices) is an explicit placement."""
    cohort = request.getfixturevalue("cohort" if path == "device_cache" else "fed_cohort")
    inputs = splits if path == "device_cache" else host_splits
    runs = [make_run(starts, table, *r) for r in RUNS[:4]]
    state = cohort.init(variables, runs)
    masks, bn_modes, keys = cohort.stack_inputs(runs)
    with jax.transfer_guard("disallow"):
        for epoch in range(2):
            state, losses, _, _ = cohort_lib.train_epoch(
                cohort, state, masks, bn_modes, inputs["train"], BATCH, [r.seed for r in runs],
                epoch, keys, [True] * 4)
        evaluated = cohort_lib.evaluate(cohort, state.shared, cohort_lib.live(state.runs),
                                        inputs["validation"], BATCH)
        state = cohort.keep_best(state, [True, False, True, False])
    assert np.all(np.isfinite(losses))
    assert all(e["predicted"].shape == (len(inputs["validation"]),) for e in evaluated)


def assert_same_bits(got: cohort_lib.FitResult, want: cohort_lib.FitResult):
    assert got.history == want.history
    for a, b in zip(jax.tree.leaves(jax.device_get((got.final_variables, got.best_variables))),
                    jax.tree.leaves(jax.device_get((want.final_variables,
                                                    want.best_variables)))):
        assert np.array_equal(a, b)


def test_a_run_does_not_depend_on_its_slot_or_cohort_mates(cohort, variables, table, splits,
                                                          starts):
    """Bitwise: a run's arithmetic is its own whatever runs share its cohort and wherever it
    sits, so a resumed search may regroup runs."""
    run = lambda runs: fit(cohort, variables, [make_run(starts, table, *r) for r in runs],
                           splits, epochs=2)

    first = run(RUNS[:4])
    regrouped = run([RUNS[5], RUNS[2], RUNS[0], RUNS[7]])
    assert_same_bits(regrouped[2], first[0])
    assert_same_bits(regrouped[1], first[2])


def test_steps_compiled_ahead_on_a_thread_are_reused(engine, variables, table, splits, starts):
    ahead = cohort_lib.Cohort(engine, 4)  # padded: two real runs
    sizes = {name: len(split) for name, split in splits.items()}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        planned = pool.submit(compile_steps, ahead, variables,
                              *base.candidate(variables, table, ()), BATCH,
                              (base.SIZE, base.SIZE, 3), sizes).result()
    assert ahead.compilations == {"train": 1, "eval": 1, "norms": 0}
    # The flops reported are a step's, not its epoch's: as the fed step (one per call) counts.
    fed = compile_steps(cohort_lib.Cohort(engine, 4), variables,
                        *base.candidate(variables, table, ()), BATCH, (base.SIZE, base.SIZE, 3))
    assert planned["flops"] == pytest.approx(fed["flops"], rel=0.05)
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(str(kwargs.get("fun_name")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        results = fit(ahead, variables, [make_run(starts, table, *r) for r in RUNS[:2]], splits,
                      epochs=1)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert [r.status for r in results] == ["ok", "ok"]
    assert ahead.compilations == {"train": 1, "eval": 1, "norms": 0}
    assert not [name for name in compiled if name.endswith(base.COHORT_PROGRAMS)], compiled


def test_runs_share_the_frozen_layers(cohort, variables, table, starts):
    """A run may start from its own live layers (its seed's head), never its own frozen ones:
    those are held once for the whole cohort."""
    assert "Conv1" not in cohort.engine.live
    own = {**starts[0], "params": {**starts[0]["params"], "Conv1": jax.tree.map(
        lambda x: x + 1.0, starts[0]["params"]["Conv1"])}}
    runs = [make_run(starts, table, (), 0)] * 4
    runs[0] = dataclasses.replace(runs[0], variables=own)
    with pytest.raises(ValueError, match="params/Conv1"):
        cohort.init(variables, runs)


def test_named_random_streams_are_disjoint():
    """Head initialisation, augmentation and dropout keys are separate fold_ins of the seed's
    key: none equals another, at any step (the head's key once collided with step 1's)."""
    seed_key = streams.seed_key(3)
    keys = {"head": streams.head_key(3)}
    for step in range(50):
        keys[f"augment{step}"] = streams.step_key(seed_key, streams.AUGMENT, step)
        keys[f"dropout{step}"] = streams.step_key(seed_key, streams.DROPOUT, step)
    data_ = {name: tuple(np.asarray(jax.random.key_data(k)).tolist()) for name, k in keys.items()}
    assert len(set(data_.values())) == len(data_)
    # Other seeds draw other orders; the same seed and epoch, the same order.
    order = lambda seed, epoch: streams.batch_order(seed, epoch).permutation(20).tolist()
    assert order(3, 0) == order(3, 0) and order(3, 0) != order(3, 1) != order(4, 1)


# --- settings: BatchNorm policy and learning-rate factors are data of the same step ---------

SETTINGS = [("train", 1.0, 1.0), ("frozen", 1.0, 1.0), ("train", 0.1, 10.0),
            ("frozen", 10.0, 0.5)]  # (BN policy, backbone factor, head factor)


def setting_run(starts, table, bn_policy, factor, head, seed=0):
    group = groups.Group("blocks", "x", base.CANDIDATE, bn_policy=bn_policy, lr_factor=factor)
    inputs = settings.apply(strategies.inputs(starts[seed]["params"], table, group), group, head)
    return cohort_lib.Run(inputs.mask, inputs.bn_modes, seed, variables=starts[seed])


def test_settings_train_in_one_cohort_as_alone(cohort, single, variables, table, splits,
                                               starts, engine):
    """Four settings of one candidate in one cohort (one compilation): each run as it trains
    alone; 'frozen' leaves every moving average bitwise as it was, 'train' moves the trained
    BN's only; the factors scale the steps (the runs differ)."""
    compiled = cohort.compilations["train"]
    together = fit(cohort, variables, [setting_run(starts, table, *s) for s in SETTINGS], splits)
    assert cohort.compilations["train"] == max(compiled, 1)  # at most the first, here
    for got, s in zip(together, SETTINGS):
        alone = fit(single, variables, [setting_run(starts, table, *s)], splits)[0]
        step = LEARNING_RATE * max(s[1], s[2])  # the run's largest rate
        assert_same_result(got, alone, variables, engine.live, step=step)
        start = base.flat(starts[0]["batch_stats"])
        after = base.flat(got.final_variables["batch_stats"])
        for path, value in start.items():
            moved = path[0] in base.CANDIDATE and s[0] == "train"
            assert np.array_equal(after[path], value) != moved, (s, path)
    heads = [base.flat(r.final_variables["params"][HEAD_UNIT]) for r in together]
    assert all(not np.array_equal(heads[0][k], heads[2][k]) for k in heads[0])


def test_the_default_setting_is_todays_inputs_bitwise(starts, table):
    """'train' with factors of 1: the inputs the candidate had before settings, unchanged."""
    group = groups.Group("blocks", "x", base.CANDIDATE)
    before = strategies.inputs(starts[0]["params"], table, group)
    assert settings.apply(before, group, 1.0) is before
    scaled = settings.apply(before, dataclasses.replace(group, lr_factor=0.1), 10.0)
    for path, value in base.flat(scaled.mask).items():
        want = base.flat(before.mask)[path] * np.float32(10.0 if path[0] == HEAD_UNIT else 0.1)
        assert scaled.mask is not before.mask and np.array_equal(value, want), path


def test_cohorts_of_an_engine_share_one_device_copy_of_the_frozen_layers(engine, starts,
                                                                         table):
    """Placement budgets one copy of the frozen layers: every cohort of an engine started from
    the same variables reads the same device arrays, not an upload of its own."""
    runs = lambda k: [make_run(starts, table, (), s) for s in SEEDS[:k]]
    first = cohort_lib.Cohort(engine, 2).init(starts[SEEDS[0]], runs(2))
    second = cohort_lib.Cohort(engine, 1).init(starts[SEEDS[0]], runs(1))
    assert all(a is b for a, b in zip(jax.tree.leaves(first.shared),
                                      jax.tree.leaves(second.shared)))
    other = jax.tree.map(np.copy, starts[SEEDS[0]])  # other arrays: placed anew
    third = cohort_lib.Cohort(engine, 1).init(other, [make_run(starts, table, (),
                                                               SEEDS[0])])
    assert not any(a is b for a, b in zip(jax.tree.leaves(first.shared),
                                          jax.tree.leaves(third.shared)))
