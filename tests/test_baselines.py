"""Today's one-run methods in the training loop: masks of learning-rate multipliers, masks that
change between epochs (gradual unfreezing, Auto-RGN) with one compilation per engine, and
Auto-RGN against a reference loop written here in plain JAX and optax."""
import concurrent.futures

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from blockft_jax import models
from blockft_jax.candidates import groups, strategies
from blockft_jax.common import streams
from blockft_jax.engine import ahead
from blockft_jax.engine import cohort as cohort_lib
from blockft_jax.engine import train
from blockft_jax.inputs import data
from blockft_jax.models import HEAD_UNIT

import test_train as base

BATCH = 8
EPOCHS = 3
LEARNING_RATE = 1e-2


@pytest.fixture(scope="module")
def model():
    return base.create_model()


@pytest.fixture(scope="module")
def table(model):
    return models.layer_table(model, (base.SIZE, base.SIZE, 3))


@pytest.fixture(scope="module")
def variables(model):
    """Random weights with moving statistics unlike any batch's, and a head drawn from seed 0
    (its bias 0: a fresh head's)."""
    v = base.pretrained_like(model)
    head = models.init_head(model, (base.SIZE, base.SIZE, 3), streams.head_key(0))
    return {**v, "params": {**v["params"], HEAD_UNIT: jax.device_get(head)}}


@pytest.fixture(scope="module")
def engine(model, table):
    """The whole network's engine (every layer can train), Adam, images fed from the host."""
    cfg = ml_collections.ConfigDict({"optimizer": "adam", "learning_rate": LEARNING_RATE,
                                     "epochs": EPOCHS})
    return train.Engine(model, train.make_optimizer(cfg, EPOCHS * 3), model.unit_names()[0],
                        train.data_mesh(), table=table)


@pytest.fixture(scope="module")
def splits():
    # 24 training images: three steps an epoch (STEPS_PER_EPOCH).
    return {name: base.synthetic_split(n, seed)
            for name, n, seed in (("train", BATCH * STEPS_PER_EPOCH, 0), ("validation", 10, 1), ("test", 10, 2))}


def run_of(variables, table, group, seed=0, record=None):
    """A cohort.Run of `group`; with `record`, every mask it is given, by epoch."""
    inputs = strategies.inputs(variables["params"], table, group)
    mask_at = inputs.mask_at
    if record is not None and mask_at is not None:
        def mask_at(epoch, norms, inner=inputs.mask_at):
            out = inner(epoch, norms)
            record[epoch] = out[0]
            return out
    return cohort_lib.Run(inputs.mask, inputs.bn_modes, seed, variables=variables,
                          mask_at=mask_at, norm_batches=inputs.norm_batches)


def fit(cohort, variables, runs, splits, **kwargs):
    return cohort_lib.fit(cohort, variables, runs, splits["train"], splits["validation"],
                          splits["test"], epochs=EPOCHS, batch_size=BATCH, **kwargs)


def flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree))


# The cohort's compiled step and a reference loop (or a cohort of another size) sum in other
# orders, and so do CPUs with and without AVX-512. A value computed from large ones carries
# their rounding, whatever its own size: a multiplier is compared within FLOAT_ORDER of the
# largest multiplier (1), and a parameter within FLOAT_ORDER of its tensor's largest value.
# Adam adds one more term: it divides each gradient by its own running scale, so the rounding
# of a gradient that nearly cancels can move a parameter by a share of a whole step (the
# learning rate), not of its value; a share ADAM_SHARE of the most that EPOCHS of Adam's steps
# move a parameter is allowed. (Seen: 6e-6 here, 1.8e-6 on a multiplier on an AMD CPU, against
# 9e-5 allowed; the wrong batches, state or masks move parameters by whole steps, 1e-2.)
FLOAT_ORDER = 2e-5
ADAM_SHARE = 1e-3
STEPS_PER_EPOCH = 3  # 24 training images in batches of BATCH
MOST_MOVED = LEARNING_RATE * EPOCHS * STEPS_PER_EPOCH  # Adam's steps are about lr at most


def assert_multipliers_close(got, want, where):
    """Auto-RGN's multipliers of one epoch ({path: value}), within float order of the largest."""
    assert got.keys() == want.keys(), where
    scale = max(abs(float(v)) for v in want.values())
    for path, value in want.items():
        assert abs(float(got[path]) - float(value)) <= FLOAT_ORDER * scale, (where, path)


def assert_params_close(got, want):
    """{path: array} trained alike: within float order of each tensor's largest magnitude, and
    a share of Adam's largest move (see above)."""
    for path, value in want.items():
        scale = float(np.max(np.abs(value))) if np.size(value) else 0.0
        np.testing.assert_allclose(got[path], value, rtol=0,
                                   atol=FLOAT_ORDER * scale + ADAM_SHARE * MOST_MOVED,
                                   err_msg=str(path))


# --- multipliers ---------------------------------------------------------------------------------

def test_multiplier_scales_the_update_and_booleans_are_bitwise_unchanged():
    """A multiplier m scales the optimizer's update by m (a per-tensor learning rate); a mask
    of booleans, or of 0.0/1.0, gives bitwise what the boolean masking gave: where(m, t, 0) on
    the inputs and the updates."""
    inner = optax.adamw(0.1, weight_decay=0.3)
    tx = train.masked(inner)
    rng = np.random.default_rng(0)
    params = {name: jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for name in "abc"}
    grads = [{name: jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for name in "abc"}
             for _ in range(3)]

    def updates(mask):
        state, out = tx.init(params), []
        for g in grads:
            u, state = tx.update(g, state, params, mask=mask)
            out.append(u)
        return out

    def boolean_masking(mask):  # the masking before multipliers, written out
        zero = lambda tree: jax.tree.map(lambda t, m: jnp.where(m, t, 0.0), tree, mask)
        state, out = inner.init(params), []
        for g in grads:
            u, state = inner.update(zero(g), state, zero(params))
            out.append(zero(u))
        return out

    booleans = {"a": np.bool_(True), "b": np.bool_(False), "c": np.bool_(True)}
    floats = {k: np.float32(v) for k, v in booleans.items()}
    want = boolean_masking(booleans)
    for mask in (booleans, floats):
        for got, w in zip(updates(mask), want):
            for k in params:
                assert np.asarray(got[k]).tobytes() == np.asarray(w[k]).tobytes(), k
    half = updates({"a": np.float32(0.5), "b": np.float32(0.0), "c": np.float32(1.0)})
    for got, w in zip(half, want):
        np.testing.assert_array_equal(got["a"], 0.5 * w["a"])  # exact: a power of two
        np.testing.assert_array_equal(got["b"], 0.0)
        np.testing.assert_array_equal(got["c"], w["c"])


def test_boolean_and_float_masks_train_bitwise_alike(engine, variables, table, splits):
    """The train step given a candidate's mask as booleans (as masks were) or as float32
    multipliers: the same new state, bit for bit, frozen parameters untouched."""
    mask, bn = base.candidate(variables, table, base.CANDIDATE)
    booleans = jax.tree.map(lambda m: np.asarray(m > 0), mask)
    state = engine.init_state(variables)
    batch = splits["train"]
    step = jax.jit(engine.train_step)
    args = (jnp.asarray(batch.images[:BATCH]), jnp.asarray(batch.labels[:BATCH]),
            jnp.ones(BATCH), streams.seed_key(0))
    got = [flat(step(jax.tree.map(jnp.copy, state), m, bn, *args)[0]["params"])
           for m in (booleans, mask)]
    start = flat(variables["params"])
    assert got[0].keys() == got[1].keys()
    for path in got[0]:
        assert got[0][path].tobytes() == got[1][path].tobytes(), path
        if path[0] not in base.CANDIDATE and path[0] != HEAD_UNIT:
            assert got[0][path].tobytes() == start[path].tobytes(), path


# --- masks that change between epochs ------------------------------------------------------------

def test_masks_change_between_epochs_with_one_compilation(engine, variables, table, splits):
    """Gradual unfreezing, Auto-RGN, llrd and a fixed candidate in one cohort: the masks change
    at epoch starts (gradual's second unit is bitwise frozen until its epoch, then trains;
    Auto-RGN's multipliers are new every epoch) and the train, eval and measurement steps
    compile once each."""
    cohort = cohort_lib.Cohort(engine, 4)
    (gradual,) = groups.gradual(table, [1], EPOCHS)
    (rgn,) = groups.auto_rgn(table, 2)
    (llrd,) = groups.llrd(table, [0.5])
    masks = {"gradual": {}, "auto_rgn": {}}
    runs = [run_of(variables, table, gradual, record=masks["gradual"]),
            run_of(variables, table, rgn, record=masks["auto_rgn"]),
            run_of(variables, table, llrd),
            run_of(variables, table, groups.classifier_only()[0])]
    snapshots = []
    fit(cohort, variables, runs, splits,
        on_epoch_end=lambda epoch, state, histories: snapshots.append(
            flat(jax.tree.map(lambda x: x[0], state.runs["params"]))))
    assert cohort.compilations == {"train": 1, "eval": 1, "norms": 1}
    assert sorted(masks["gradual"]) == sorted(masks["auto_rgn"]) == list(range(EPOCHS))
    # Gradual: the unit below the top one joins in the second epoch.
    second = groups.weighted_units(table)[1]
    layer = next(r.name for r in groups.backbone_layers(table)
                 if r.unit == second and r.kind == "conv")
    start = flat(variables["params"])
    path = (layer, "kernel")
    assert float(masks["gradual"][0][layer]["kernel"]) == 0.0
    assert float(masks["gradual"][1][layer]["kernel"]) == 1.0
    assert snapshots[0][path].tobytes() == start[path].tobytes()
    assert not np.array_equal(snapshots[1][path], start[path])
    # Auto-RGN: measured anew from each epoch's parameters.
    leaves = [np.array([float(x) for x in jax.tree.leaves(masks["auto_rgn"][e])])
              for e in range(EPOCHS)]
    assert not np.array_equal(leaves[0], leaves[1]) and max(leaves[1]) == 1.0
    # A second fit with the same cohort compiles nothing more.
    fit(cohort, variables, runs[::-1], splits)
    assert cohort.compilations == {"train": 1, "eval": 1, "norms": 1}


# --- Auto-RGN against a reference loop -----------------------------------------------------------

def reference_auto_rgn(model, table, variables, split, seed, batches):
    """Auto-RGN as its reference describes it, written with JAX and optax alone: at the start
    of each epoch, for each parameter tensor but BatchNorm's, ||grad|| / ||param|| of the
    cross-entropy on the epoch's first `batches` batches, averaged, divided by the largest,
    multiplies that tensor's learning rate (Adam; BatchNorm frozen, in inference mode). A
    tensor of norm 0 takes 1. Returns (final params, the multipliers per epoch)."""
    batchnorm = {r.name for r in table if r.kind == "batchnorm"}
    images = data.preprocess(jnp.asarray(split.images), model.preprocessing)
    labels = jnp.asarray(split.labels)
    stats = variables["batch_stats"]

    def loss(params, rows):
        logits = model.apply({"params": params, "batch_stats": stats}, images[rows])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[rows]).mean()

    grad = jax.jit(jax.grad(loss))
    params = jax.tree.map(jnp.asarray, variables["params"])
    opt = optax.adam(LEARNING_RATE)
    opt_state = opt.init(params)
    history = []
    for epoch in range(EPOCHS):
        rng = np.random.default_rng([seed, epoch])  # the run's batch order
        order = rng.permutation(len(labels)).reshape(-1, BATCH)
        ratios = {}
        for rows in order[:batches]:
            g = flat(grad(params, rows))
            for path, p in flat(params).items():
                if path[0] not in batchnorm:
                    ratios.setdefault(path, []).append(
                        np.linalg.norm(g[path]) / np.linalg.norm(p) if np.linalg.norm(p) > 0
                        else np.nan)
        measured = {path: np.mean(r) for path, r in ratios.items() if not np.isnan(r[0])}
        largest = max(measured.values())
        multiplier = {path: (0.0 if path[0] in batchnorm else
                             measured[path] / largest if path in measured else 1.0)
                      for path in flat(params)}
        history.append(multiplier)
        m = traverse_util.unflatten_dict({k: jnp.float32(v) for k, v in multiplier.items()})
        for rows in order:
            g = jax.tree.map(lambda t, w: jnp.where(w > 0, t, 0.0), grad(params, rows), m)
            updates, opt_state = opt.update(g, opt_state, params)
            params = jax.tree.map(lambda p, u, w: p + u * w, params, updates, m)
    return jax.device_get(params), history


@pytest.mark.parametrize("batches", [2])
def test_auto_rgn_matches_a_reference_loop(model, engine, variables, table, splits, batches):
    (group,) = groups.auto_rgn(table, batches)
    recorded = {}
    # Two runs (seeds 0 and 1) in one cohort: each measures from its own parameters.
    cohort = cohort_lib.Cohort(engine, 2)
    records = [recorded, {}]
    results = fit(cohort, variables, [run_of(variables, table, group, seed, records[seed])
                                      for seed in (0, 1)], splits)
    want_params, want_masks = reference_auto_rgn(model, table, variables, splits["train"], 0,
                                                 batches)
    for epoch in range(EPOCHS):
        got = flat(recorded[epoch])
        assert_multipliers_close(got, want_masks[epoch], epoch)
    assert float(got[(HEAD_UNIT, "kernel")]) > 0
    assert_params_close(flat(results[0].final_variables["params"]), flat(want_params))
    # BatchNorm neither trained nor moved its statistics.
    for collection in ("params", "batch_stats"):
        got = flat(results[0].final_variables[collection])
        for path, value in flat(variables[collection]).items():
            if path[0] in {r.name for r in table if r.kind == "batchnorm"}:
                assert got[path].tobytes() == value.tobytes(), path
    # The other seed measured its own batches: other multipliers.
    assert any(float(a) != float(b) for a, b in zip(jax.tree.leaves(records[1][0]),
                                                     jax.tree.leaves(recorded[0])))


def test_an_auto_rgn_run_trains_alike_beside_other_runs(engine, variables, table, splits):
    """In a cohort with runs of other strategies (full's, gradual's, second and last), an
    Auto-RGN run measures and trains on its own: its multipliers and final parameters are what
    it gets alone, up to float order."""
    auto, = groups.auto_rgn(table, 2)
    full = groups.Group("full", "full", tuple(r.name for r in groups.backbone_layers(table)))
    gradual, = groups.gradual(table, (1,), EPOCHS)
    alone, mixed = {}, {}
    single = fit(cohort_lib.Cohort(engine, 1), variables,
                 [run_of(variables, table, auto, 1, alone)], splits)[0]
    runs = [run_of(variables, table, full, 0), run_of(variables, table, auto, 1, mixed),
            run_of(variables, table, gradual, 0)]
    beside = fit(cohort_lib.Cohort(engine, 3), variables, runs, splits)[1]
    for epoch in range(EPOCHS):
        assert_multipliers_close(flat(mixed[epoch]), flat(alone[epoch]), epoch)
    assert_params_close(flat(beside.final_variables["params"]),
                        flat(single.final_variables["params"]))


@pytest.mark.parametrize("on_device", [False, True], ids=["fed", "device_split"])
def test_the_norms_step_compiled_ahead_is_the_one_measuring(engine, variables, table, splits,
                                                            on_device):
    """compile_norms (the search runs it on a background thread) traces Auto-RGN's measurement
    with the shapes and shardings of the real calls: training afterwards traces it no more,
    with batches fed from the host and gathered from splits in device memory."""
    cohort = cohort_lib.Cohort(engine, 2)
    used = {k: engine.to_device(v) for k, v in splits.items()} if on_device else splits
    sizes = {k: len(v.labels) for k, v in splits.items()} if on_device else None
    auto, = groups.auto_rgn(table, 2)
    bn_modes = run_of(variables, table, auto).bn_modes
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(ahead.compile_norms, cohort, variables, bn_modes, BATCH,
                    (base.SIZE, base.SIZE, 3), sizes).result()
    assert cohort.compilations["norms"] == 1
    fit(cohort, variables, [run_of(variables, table, auto, seed) for seed in (0, 1)], used)
    assert cohort.compilations["norms"] == 1


def test_adam_counts_steps_per_tensor_from_when_it_trains():
    """Under the search's Adam, a tensor unfrozen after some steps (gradual unfreezing) is
    updated as by a fresh Adam begun at its first trained step (PyTorch's Adam counts steps per
    parameter); one trained throughout exactly as by optax's Adam on the whole tree (bitwise,
    compiled)."""
    cfg = ml_collections.ConfigDict({"optimizer": "adam", "learning_rate": 0.1, "epochs": 1})
    tx = train.make_optimizer(cfg, 10)
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
             for _ in range(6)]
    step_fn = jax.jit(lambda g, s, m: tx.update(g, s, params, mask=m))
    state, got = tx.init(params), []
    for step, g in enumerate(grads):
        u, state = step_fn(g, state, {"a": np.float32(1.0), "b": np.float32(step >= 3)})
        got.append(u)
    schedule = train.learning_rate_schedule(cfg, 10)
    # Before: optax's Adam, one step count, inside the same masking.
    shared = train.masked(optax.adam(schedule))
    shared_step = jax.jit(lambda g, s, m: shared.update(g, s, params, mask=m))
    fresh = optax.adam(schedule)
    fresh_step = jax.jit(fresh.update)
    before, late = shared.init(params), fresh.init(params["b"])
    for step, g in enumerate(grads):
        u, before = shared_step(g, before, {"a": np.float32(1.0), "b": np.float32(step >= 3)})
        assert np.asarray(got[step]["a"]).tobytes() == np.asarray(u["a"]).tobytes(), step
        if step < 3:
            np.testing.assert_array_equal(got[step]["b"], 0.0)
        else:
            u_b, late = fresh_step(g["b"], late)
            np.testing.assert_allclose(got[step]["b"], u_b, rtol=1e-6, err_msg=str(step))
            # One shared count would have given another update (bias-corrected at step 4+).
            assert not np.allclose(u["b"], u_b, rtol=1e-3), step


# --- LP-FT and L2-SP ---------------------------------------------------------------------------

def test_lp_ft_probes_as_classifier_only_then_fine_tunes_with_a_fresh_backbone_state(
        engine, variables, table, splits):
    """LP-FT's probe epochs are classifier-only's run, bit for bit (history and parameters);
    then every layer trains, the head's Adam state carried on and the backbone's fresh: the
    same as classifier-only stopped after the probe and resumed with every layer."""
    probe = EPOCHS - 1
    (lp_ft,) = groups.lp_ft(table, probe)
    (head_only,) = groups.classifier_only()
    snapshots = []
    cohort = cohort_lib.Cohort(engine, 2)
    both = fit(cohort, variables, [run_of(variables, table, head_only),
                                   run_of(variables, table, lp_ft)], splits,
               on_epoch_end=lambda epoch, state, histories: snapshots.append(
                   [flat(jax.tree.map(lambda x: x[i], state.runs["params"])) for i in (0, 1)]))
    assert cohort.compilations["train"] == 1
    history = [r.history for r in both]
    assert history[0][:probe] == history[1][:probe]
    assert history[0][probe] != history[1][probe]
    start = flat(variables["params"])
    for epoch in range(EPOCHS):
        head, lp = snapshots[epoch]
        for path in start:
            if epoch < probe:
                assert lp[path].tobytes() == head[path].tobytes(), (epoch, path)
            elif path[0] != HEAD_UNIT and path[-1] == "kernel":
                assert not np.array_equal(lp[path], start[path]), (epoch, path)
    # Classifier-only stopped after the probe, resumed with every layer: LP-FT's run.
    stopped = cohort_lib.fit(cohort, variables, [run_of(variables, table, head_only)] * 2,
                             splits["train"], splits["validation"], splits["test"],
                             epochs=probe, batch_size=BATCH, keep_state=True)[0].stopped
    everything = groups.Group("full", "full", lp_ft.layers)
    resumed = run_of(variables, table, everything)
    resumed.resume = stopped
    again = fit(cohort, variables, [resumed, run_of(variables, table, head_only)], splits)[0]
    assert again.history == both[1].history
    assert_params_close(flat(again.final_variables["params"]),
                        flat(both[1].final_variables["params"]))


def test_l2sp_penalty_gradient_is_alpha_times_the_distance_and_beta_times_the_head(
        model, table, variables):
    """The gradient L2-SP adds: alpha * (w - w0) on a backbone tensor, beta * w on the head;
    strengths of 0 leave every gradient bitwise as it was."""
    cfg = ml_collections.ConfigDict({"optimizer": "adam", "learning_rate": 1e-3, "epochs": 1})
    anchored = train.Engine(model, train.make_optimizer(cfg, 1), model.unit_names()[0],
                            train.data_mesh(), table=table, anchored=True)
    rng = np.random.default_rng(0)
    live = anchored.live_part(variables["params"])
    moved = jax.tree.map(lambda w: w + rng.normal(size=w.shape).astype(w.dtype), live)
    grads = jax.tree.map(lambda w: rng.normal(size=w.shape).astype(np.float32), live)
    anchor = anchored.anchor(variables["params"])
    assert HEAD_UNIT not in anchor and anchor.keys() == live.keys() - {HEAD_UNIT}
    for alpha, beta in ((0.0, 0.0), (0.1, 0.0), (0.0, 0.5), (0.1, 0.5)):
        state = {"penalty": jnp.asarray([alpha, beta], jnp.float32), "anchor": anchor}
        got = flat(anchored.penalised(grads, moved, state))
        g, w, w0 = flat(grads), flat(moved), flat(variables["params"])
        for path in g:
            strength = beta if path[0] == HEAD_UNIT else alpha
            if strength == 0:
                assert got[path].tobytes() == g[path].tobytes(), (alpha, beta, path)
                continue
            pulled_to = 0.0 if path[0] == HEAD_UNIT else w0[path]
            np.testing.assert_allclose(got[path], g[path] + strength * (w[path] - pulled_to),
                                       rtol=1e-6, atol=1e-6, err_msg=str(path))


def test_l2sp_at_zero_trains_as_full_bitwise_and_pulls_towards_the_start(
        model, variables, table, splits, engine):
    """In one cohort of an anchored engine (one compilation): L2-SP with alpha = beta = 0 is
    full fine-tuning bit for bit; a strong alpha keeps the backbone nearer its start, a strong
    beta the head nearer 0."""
    cfg = ml_collections.ConfigDict({"optimizer": "adam", "learning_rate": LEARNING_RATE,
                                     "epochs": EPOCHS})
    anchored = train.Engine(model, train.make_optimizer(cfg, EPOCHS * 3), model.unit_names()[0],
                            train.data_mesh(), table=table, anchored=True)
    (full,) = groups.full(table)
    zero, strong = groups.l2sp(table, (0.0,), 0.0) + groups.l2sp(table, (30.0,), 30.0)

    def run(group):
        inputs = strategies.inputs(variables["params"], table, group)
        return cohort_lib.Run(inputs.mask, inputs.bn_modes, 0, variables=variables,
                              penalty=inputs.penalty)
    assert run(zero).penalty == (0.0, 0.0) and run(strong).penalty == (30.0, 30.0)
    with pytest.raises(ValueError, match="without one"):  # never a penalty silently dropped
        fit(cohort_lib.Cohort(engine, 1), variables, [run(strong)], splits)
    cohort = cohort_lib.Cohort(anchored, 3)
    results = fit(cohort, variables, [run(full), run(zero), run(strong)], splits)
    assert cohort.compilations["train"] == 1
    got = [flat(r.final_variables["params"]) for r in results]
    for path in got[0]:
        assert got[0][path].tobytes() == got[1][path].tobytes(), path
    start = flat(variables["params"])
    distance = lambda params, head: sum(
        float(np.sum(np.square(params[p] - (0.0 if head else start[p])))) for p in params
        if (p[0] == HEAD_UNIT) == head)
    assert distance(got[2], False) < 0.5 * distance(got[0], False)
    assert distance(got[2], True) < distance(got[0], True)
