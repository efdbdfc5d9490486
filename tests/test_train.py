"""The engine's guarantees, on CPU, for one run (a cohort of one): masks and BN modes are
exact, one compilation serves every candidate (and can happen ahead, on another thread), the
prefix cache and the gradient cut change nothing, data parallelism (one host, and two processes)
agrees with one device, and bfloat16 compute keeps float32 parameters."""
import concurrent.futures
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from blockft_jax import models
from blockft_jax.candidates import groups, settings, strategies
from blockft_jax.engine import ahead
from blockft_jax.engine import cohort as cohort_lib
from blockft_jax.engine import placement, train
from blockft_jax.inputs import data
from blockft_jax.models import HEAD_UNIT

import distributed_worker as worker
from cpu_devices import cpu_devices_env

SIZE = 32
# The names a cohort's programs compile under, 'jit(<function>)' (vmapped.VmappedSteps' methods,
# and the lambdas that take and replicate a run): none may compile again once compiled ahead.
COHORT_PROGRAMS = ("_step)", "_gathered)", "(init_runs)", "(keep_best)", "(<lambda>)")
BATCH = 8
# A BatchNorm layer and a conv layer, in two different blocks above the stem.
CANDIDATE = ("block_1_depthwise_BN", "block_2_project")
WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")
SUBPROCESS_TIMEOUT = 420


def create_model(**options):
    return models.create(worker.MODEL["name"], width=worker.MODEL["width"],
                         blocks=worker.MODEL["blocks"], num_classes=worker.MODEL["num_classes"],
                         **options)


def make_engine(module, from_unit, *, optimizer="sgd", cached=False, table=None,
                prefix_chunk_bytes=None, augment=None):
    cfg = ml_collections.ConfigDict(
        {**worker.OPTIMIZER, "optimizer": optimizer,
         "learning_rate": 1e-3 if optimizer == "adam" else worker.OPTIMIZER["learning_rate"]})
    return train.Engine(module, train.make_optimizer(cfg, 100), from_unit, train.data_mesh(),
                        cached=cached, table=table, prefix_chunk_bytes=prefix_chunk_bytes,
                        augment=augment)


def flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree))


COHORTS = {}


def cohort_of(engine) -> cohort_lib.Cohort:
    """The engine's cohort of one run: a single run is a cohort of one."""
    if id(engine) not in COHORTS:
        COHORTS[id(engine)] = (engine, cohort_lib.Cohort(engine, 1))
    return COHORTS[id(engine)][1]


def whole_state(cohort, state):
    """The one run's whole state (host copies): frozen and live variables, optimizer, step."""
    shared, runs = jax.device_get((state.shared, state.runs))
    one = jax.tree.map(lambda x: x[0], runs)
    return {**cohort.whole(shared, one), "opt_state": one["opt_state"], "step": one["step"]}


def run(engine, variables, mask, bn_modes, split):
    """One epoch over `split` in batches of BATCH (fixed shuffle), one step at a time. Host
    copies out: the run's whole state, and each step's loss."""
    cohort = cohort_of(engine)
    one = cohort_lib.Run(mask, bn_modes, seed=0)
    state = cohort.init(variables, [one])
    masks, bns, keys = cohort.stack_inputs([one])
    active = cohort.place_runs(np.ones(1, bool))
    runs, losses = state.runs, []
    for batch in data.batches(split, BATCH, shuffle_rng=np.random.default_rng(0)):
        runs, metrics = cohort.train_step(state.shared, runs, masks, bns,
                                          cohort.feed(batch.images[None]),
                                          cohort.feed(batch.labels[None]),
                                          cohort.feed(batch.mask[None]), keys, active)
        losses.append(float(metrics["loss"][0]))
    return whole_state(cohort, cohort_lib.CohortState(state.shared, runs, state.best)), \
        np.asarray(losses)


def epochs(engine, variables, mask, bn_modes, split, count):
    """`count` epochs of one run through cohort.train_epoch (device splits gathered on the
    device, host splits fed); returns (cohort state, [(loss, accuracy)])."""
    cohort = cohort_of(engine)
    one = cohort_lib.Run(mask, bn_modes, seed=0)
    state = cohort.init(variables, [one])
    masks, bns, keys = cohort.stack_inputs([one])
    out = []
    for epoch in range(count):
        state, losses, accuracies, _ = cohort_lib.train_epoch(
            cohort, state, masks, bns, split, BATCH, [0], epoch, keys, [True])
        out.append((losses[0], accuracies[0]))
    return state, out


def evaluate(engine, state, split):
    return cohort_lib.evaluate(cohort_of(engine), state.shared, cohort_lib.live(state.runs),
                               split, BATCH)[0]


def candidate(variables, table, layers, freeze_bn=False):
    """The mask and BN modes of `layers` under BatchNorm policy 'frozen' (freeze_bn) or
    'train', as the search makes them (settings.apply)."""
    group = groups.Group("blocks", "x", tuple(layers),
                         bn_policy="frozen" if freeze_bn else "train")
    inputs = settings.apply(strategies.inputs(variables["params"], table, group), group, head=1.0)
    return inputs.mask, inputs.bn_modes


# --- shared model, data and compiled engines ---------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return create_model()


@pytest.fixture(scope="module")
def table(model):
    return models.layer_table(model, (SIZE, SIZE, 3))


def pretrained_like(model):
    """Random weights, and moving statistics unlike any batch's (as after pretraining), so that
    a BN using batch statistics and one using its moving statistics give visibly different
    results."""
    v = jax.device_get(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3))))
    rng = np.random.default_rng(1)
    for stats in v["batch_stats"].values():
        stats["mean"] = rng.normal(0.0, 0.2, stats["mean"].shape).astype(np.float32)
        stats["var"] = rng.uniform(0.5, 2.0, stats["var"].shape).astype(np.float32)
    return v


@pytest.fixture(scope="module")
def variables(model):
    return pretrained_like(model)


def synthetic_split(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    return data.Split(images, (np.arange(n) % 3).astype(np.int32))


@pytest.fixture(scope="module")
def split():
    return synthetic_split(3 * BATCH, seed=0)  # three steps a run


@pytest.fixture(scope="module")
def engine_stem(model):
    return make_engine(model, "stem")


@pytest.fixture(scope="module")
def engine_b1(model):
    return make_engine(model, "block_1")


@pytest.fixture(scope="module")
def engine_b1_cached(model):
    return make_engine(model, "block_1", cached=True)


@pytest.fixture(scope="module")
def engine_adam(model):
    return make_engine(model, "block_1", optimizer="adam")


# --- checks ------------------------------------------------------------------------------------

def assert_close_states(got, want, atol=1e-5):
    for key in ("params", "batch_stats"):
        got_flat, want_flat = flat(got[key]), flat(want[key])
        assert got_flat.keys() == want_flat.keys()
        for path, value in want_flat.items():
            np.testing.assert_allclose(got_flat[path], value, rtol=1e-5, atol=atol,
                                       err_msg=str(path))


def param_shaped(opt_state, params):
    """The optimizer's per-parameter buffers (momentum trace, Adam's mu and nu), shaped like
    `params` or like the engine's live part of it (whole layers)."""
    def is_buffer(x):
        return (isinstance(x, dict) and bool(x) and set(x) <= set(params) and
                all(jax.tree.structure(x[k]) == jax.tree.structure(params[k]) for k in x))
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_buffer) if is_buffer(x)]


def assert_masked_training(start, state, table, layers, freeze_bn):
    """Frozen params and BN statistics bitwise unchanged; trained ones (and the head) moved."""
    trained = set(layers) | {HEAD_UNIT}
    kinds = {r.name: r.kind for r in table}
    trained_bn = set() if freeze_bn else {n for n in layers if kinds[n] == "batchnorm"}
    before, after = flat(start["params"]), flat(state["params"])
    assert before.keys() == after.keys()
    for path, old in before.items():
        new = after[path]
        assert new.dtype == np.float32, path
        if path[0] in trained:
            assert not np.array_equal(new, old), f"trained param {path} did not move"
        else:
            assert np.array_equal(new, old), f"frozen param {path} changed"
    before, after = flat(start["batch_stats"]), flat(state["batch_stats"])
    assert before.keys() == after.keys()
    for path, old in before.items():
        if path[0] in trained_bn:
            assert not np.array_equal(after[path], old), f"stat {path} of a trained BN is stale"
        else:
            assert np.array_equal(after[path], old), f"stat {path} of a frozen BN changed"
    # Frozen entries never enter the optimizer: their moments stay exactly zero.
    buffers = param_shaped(state["opt_state"], state["params"])
    assert buffers, "no per-parameter optimizer state found"
    for buffer in buffers:
        for path, value in flat(buffer).items():
            if path[0] in trained:
                assert np.any(value != 0), path
            else:
                assert not np.any(value), f"optimizer state of frozen {path} is not zero"


# --- 2. one compilation for every candidate ----------------------------------------------------
# (First in the file, so that with the whole file it also sees the one compilation happen.)

def test_one_compilation_serves_every_candidate(engine_stem, variables, table, split):
    seen = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" \
                and kwargs.get("fun_name") == "jit(train_step)":
            seen.append(duration)

    cohort = cohort_of(engine_stem)
    compiled_before = cohort.compilations["train"]
    candidates = [(g.layers, False) for g in (groups.layerwise(table, 1)
                                              + groups.blocks(table, "units", max_blocks=1)
                                              + groups.classifier_only())]
    candidates += [(CANDIDATE, False), (CANDIDATE, True),
                   (groups.full(table)[0].layers, True)]
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for layers, freeze_bn in candidates:
            state, _ = run(engine_stem, variables, *candidate(variables, table, layers, freeze_bn),
                           split)
            assert_masked_training(variables, state, table, layers, freeze_bn)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)

    assert cohort.compilations["train"] == 1
    assert len(seen) == 1 - compiled_before  # XLA compiled it here iff not compiled before
    if hasattr(cohort.train_step, "_cache_size"):
        assert cohort.train_step._cache_size() == 1


# --- 1. masks, BN modes and weight decay ---------------------------------------------------------

@pytest.mark.parametrize("freeze_bn", [False, True], ids=["bn_in_group_trains", "freeze_bn"])
@pytest.mark.parametrize("engine_name", ["engine_stem", "engine_adam"], ids=["sgd", "adam"])
def test_mask_freezes_exactly(request, engine_name, freeze_bn, variables, table, split):
    engine = request.getfixturevalue(engine_name)
    mask, bn_modes = candidate(variables, table, CANDIDATE, freeze_bn)
    assert bn_modes["block_1_depthwise_BN"] == (not freeze_bn)
    assert sum(bool(m) for m in bn_modes.values()) == (0 if freeze_bn else 1)
    state, losses = run(engine, variables, mask, bn_modes, split)
    assert np.all(np.isfinite(losses))
    assert_masked_training(variables, state, table, CANDIDATE, freeze_bn)
    assert int(state["step"]) == len(losses)


def test_frozen_batchnorm_runs_in_inference_mode(engine_stem, model, variables, table, split):
    """Keras's rule: the first step's loss of a candidate without BN in the group equals the
    loss of the model in inference mode; with a BN of the group on batch statistics it differs."""
    images, labels = split.images[:BATCH], split.labels[:BATCH]
    forward = lambda v, x: model.apply(v, data.preprocess(x, model.preprocessing), train=False)
    logits = jax.jit(forward)(variables, images)
    expected = float(train._weighted_loss(logits, labels, jnp.ones(BATCH)))
    one = data.Split(images, labels)
    for layers, freeze_bn, same in [((), False, True), (CANDIDATE, True, True),
                                    (CANDIDATE, False, False)]:
        _, losses = run(engine_stem, variables, *candidate(variables, table, layers, freeze_bn),
                        one)
        if same:
            np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
        else:
            assert abs(losses[0] - expected) > 1e-3


# --- 3. the prefix cache -------------------------------------------------------------------------

def test_prefix_cache_is_exact(engine_b1, engine_b1_cached, variables, table, split):
    cached = engine_b1_cached
    features = cached.features(variables, split, BATCH)
    assert features.images.dtype == np.float32 and features.images.shape[0] == len(split)
    np.testing.assert_array_equal(features.labels, split.labels)
    mask, bn_modes = candidate(variables, table, CANDIDATE)
    want, want_losses = run(engine_b1, variables, mask, bn_modes, split)
    got, got_losses = run(cached, variables, mask, bn_modes, features)
    assert cohort_of(cached).compilations["train"] == cached.compilations["features"] == 1
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    assert_close_states(got, want)
    assert_masked_training(variables, got, table, CANDIDATE, False)


def train_fed_and_on_device(engine, variables, table, split, on_device):
    """Two epochs and an evaluation of CANDIDATE from `split` fed by the host and from its
    DeviceSplit: checks they agree; returns the on-device run's state."""
    mask, bn_modes = candidate(variables, table, CANDIDATE)
    results = []
    for inputs in (split, on_device):
        state, losses = epochs(engine, variables, mask, bn_modes, inputs, 2)
        results.append((whole_state(cohort_of(engine), state), losses,
                        evaluate(engine, state, inputs)))
    (want, want_losses, want_eval), (got, got_losses, got_eval) = results
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    assert got_eval["accuracy"] == want_eval["accuracy"]
    np.testing.assert_allclose(got_eval["loss"], want_eval["loss"], rtol=1e-5)
    assert_close_states(got, want)
    return got


def test_cache_in_device_memory_trains_and_evaluates_as_on_the_host(model, variables, table):
    """A DeviceSplit's epoch and evaluation (batches gathered on the device by the steps)
    give what the fed path gives for the same cached features, including a padded last
    batch."""
    engine = make_engine(model, "block_1", cached=True, table=table)
    features = engine.features(variables, synthetic_split(3 * BATCH - 3, seed=4), BATCH)
    on_device = engine.to_device(features)
    assert isinstance(on_device, train.DeviceSplit) and len(on_device) == len(features)
    assert engine.feature_bytes(len(features)) == features.images.nbytes
    got = train_fed_and_on_device(engine, variables, table, features, on_device)
    assert_masked_training(variables, got, table, CANDIDATE, False)
    assert cohort_of(engine).compilations["train"] == 2  # the fed step and the gathering one


def test_images_in_device_memory_train_and_evaluate_as_fed(model, variables, table):
    """An engine without a prefix cache (on an accelerator) keeps its uint8 images in device
    memory when they fit: its epochs and evaluation gather the batches there and give what the
    fed path gives, augmentation included."""
    engine = make_engine(model, "block_1", table=table, augment={"flip": True, "crop": True})
    images = synthetic_split(3 * BATCH - 3, seed=5)
    on_device = engine.to_device(images)
    assert on_device.images.dtype == np.uint8 and len(on_device) == len(images)
    train_fed_and_on_device(engine, variables, table, images, on_device)


def test_cache_on_device_within_a_quarter_of_free_accelerator_memory():
    import types

    def mesh(*stats):
        devices = [types.SimpleNamespace(platform="gpu", process_index=0,
                                         memory_stats=lambda s=s: s) for s in stats]
        return types.SimpleNamespace(devices=np.asarray(devices, dtype=object))

    # CPU: host memory either way.
    assert placement.cache_on_device(10**12, train.data_mesh(), free=1)
    gpus = mesh({"bytes_limit": 400, "bytes_in_use": 0}, {"bytes_limit": 900,
                                                           "bytes_in_use": 100})
    free = placement.free_memory(gpus)
    assert free == 400
    assert placement.cache_on_device(100, gpus, free)
    assert not placement.cache_on_device(101, gpus, free)
    assert placement.free_memory(mesh(None)) == 0  # memory unknown:
    assert not placement.cache_on_device(1, mesh(None), 0)  # keep it on the host


@pytest.mark.parametrize("on_device", [False, True], ids=["host_cache", "device_cache"])
def test_steps_compiled_ahead_on_a_thread_are_reused(model, variables, table, split, on_device):
    """compile_steps (as the search runs it, on a background thread) leaves nothing for the
    real steps to trace or compile: same shapes, shardings and structure as the real calls,
    for a cache on the host (fed batches) and in device memory (gathered batches)."""
    engine = make_engine(model, "block_1", cached=True, optimizer="adam", table=table)
    cohort = cohort_of(engine)
    mask, bn_modes = candidate(variables, table, CANDIDATE)
    validation = synthetic_split(BATCH + 1, seed=5)
    sizes = {"train": len(split), "validation": len(validation)} if on_device else None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        memory = pool.submit(ahead.compile_steps, cohort, variables,
                             *candidate(variables, table, ()), BATCH, (SIZE, SIZE, 3),
                             sizes).result()
    assert cohort.compilations == {"train": 1, "eval": 1, "norms": 0}
    assert memory["train"] > 0 and memory["eval"] > 0 and memory["flops"] > 0
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(str(kwargs.get("fun_name")))

    features, validation = (engine.features(variables, s, BATCH) for s in (split, validation))
    if on_device:
        features, validation = engine.to_device(features), engine.to_device(validation)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        state, _ = epochs(engine, variables, mask, bn_modes, features, 1)
        evaluate(engine, state, validation)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert cohort.compilations == {"train": 1, "eval": 1, "norms": 0}
    assert engine.compilations == {"features": 1}
    assert not [name for name in compiled if name.endswith(COHORT_PROGRAMS)], compiled


def test_prefix_in_micro_batches_changes_nothing(engine_b1, engine_b1_cached, model, variables,
                                                 table, split):
    """The frozen prefix run over micro-batches (CPU's cache-friendly default) gives the whole
    batch's features and training, in both the cached and the uncached engine."""
    chunked = make_engine(model, "block_1", cached=True, table=table, prefix_chunk_bytes=1)
    assert chunked.prefix_chunk(BATCH) == 1 and chunked.prefix_chunk(7) == 1
    largest = max(np.prod(r.output_shape[1:]) * 4 for r in table if r.unit == "stem")
    assert make_engine(model, "block_1", table=table,
                       prefix_chunk_bytes=int(3 * largest)).prefix_chunk(BATCH) == 2
    assert make_engine(model, "block_1", table=table,
                       prefix_chunk_bytes=int(100 * largest)).prefix_chunk(BATCH) is None
    want = engine_b1_cached.features(variables, split, BATCH)
    got = chunked.features(variables, split, BATCH)
    np.testing.assert_allclose(got.images, want.images, rtol=1e-6, atol=1e-6)

    mask, bn_modes = candidate(variables, table, CANDIDATE)
    want_state, want_losses = run(engine_b1, variables, mask, bn_modes, split)
    uncached = make_engine(model, "block_1", table=table, prefix_chunk_bytes=1)
    got_state, got_losses = run(uncached, variables, mask, bn_modes, split)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    assert_close_states(got_state, want_state)


# --- 4. cutting the gradient at from_unit --------------------------------------------------------

def test_gradient_cut_changes_nothing_and_saves_work(engine_stem, engine_b1, variables, table,
                                                      split):
    mask, bn_modes = candidate(variables, table, CANDIDATE)
    want, want_losses = run(engine_stem, variables, mask, bn_modes, split)
    got, got_losses = run(engine_b1, variables, mask, bn_modes, split)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    assert_close_states(got, want)
    for name in ("opt_state", "step"):
        for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # No backward pass below the cut: the step from block_1 costs fewer FLOPs.
    flops = lambda engine: ahead.compile_steps(
        cohort_of(engine), variables, mask, bn_modes, BATCH, (SIZE, SIZE, 3))["flops"]
    assert flops(engine_b1) < 0.95 * flops(engine_stem)
    assert cohort_of(engine_stem).compilations["train"] == 1
    assert cohort_of(engine_b1).compilations["train"] == 1


def test_live_subset_engine_matches_and_keeps_state_small(engine_b1, model, variables, table,
                                                          split):
    """With the layer table, optimizer state and updates cover only layers at or above
    from_unit; training is unchanged."""
    live_engine = make_engine(model, "block_1", table=table)
    mask, bn_modes = candidate(variables, table, CANDIDATE)
    want, want_losses = run(engine_b1, variables, mask, bn_modes, split)
    got, got_losses = run(live_engine, variables, mask, bn_modes, split)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    assert_close_states(got, want)
    assert_masked_training(variables, got, table, CANDIDATE, False)
    below = {r.name for r in table if r.has_weights and r.unit == "stem"}
    assert below and live_engine.live.isdisjoint(below)
    assert {"head", *CANDIDATE} <= live_engine.live
    leaves = len(jax.tree.leaves(live_engine.init_state(variables)["opt_state"]))
    assert leaves < len(jax.tree.leaves(engine_b1.init_state(variables)["opt_state"]))


# --- 7. bfloat16 compute -------------------------------------------------------------------------

def test_bfloat16_compute_keeps_float32_params(engine_b1, variables, table, split):
    engine = make_engine(create_model(dtype=jnp.bfloat16), "block_2")
    layers = ("block_2_project", "block_2_project_BN")
    mask, bn_modes = candidate(variables, table, layers)
    one = data.Split(split.images[:BATCH], split.labels[:BATCH])
    state, losses = run(engine, variables, mask, bn_modes, one)
    assert np.all(np.isfinite(losses))
    for tree in (state["params"], state["batch_stats"]):
        assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {np.dtype(np.float32)}
    assert_masked_training(variables, state, table, layers, False)
    # Same loss as float32 compute, to bfloat16 precision.
    _, f32_losses = run(engine_b1, variables, mask, bn_modes, one)
    np.testing.assert_allclose(losses, f32_losses, rtol=5e-2)


# --- 5 and 6. data parallelism: 8 devices, and 2 processes -----------------------------------

@pytest.fixture(scope="module")
def worker_split():
    return synthetic_split(40, seed=2)  # batches of 16: the last one is padded


@pytest.fixture(scope="module")
def worker_inputs(tmp_path_factory, variables, worker_split):
    path = tmp_path_factory.mktemp("worker") / "inputs.npz"
    split = worker_split
    arrays = {**worker.flatten(variables["params"], "params/"),
              **worker.flatten(variables["batch_stats"], "batch_stats/")}
    np.savez(path, images=split.images, labels=split.labels, layers=np.asarray(CANDIDATE),
             **arrays)
    return path


def worker_env(device_count):
    env = {**os.environ, **cpu_devices_env(device_count)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORKER.parent.parent),
                                                      env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def mesh_run(worker_inputs):
    out = worker_inputs.with_name("mesh.npz")
    result = subprocess.run([sys.executable, str(WORKER), "mesh", str(worker_inputs), str(out)],
                            env=worker_env(8), capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(out) as f:
        return dict(f)


def split_result(arrays, prefix):
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def assert_same_training(got, want, inputs):
    assert got.keys() >= want.keys()
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
        if key in inputs and key.split("/")[1] not in CANDIDATE + (HEAD_UNIT,):
            assert np.array_equal(got[key], inputs[key]), f"frozen {key} changed"


def test_data_parallel_8_devices_matches_one(mesh_run, worker_inputs):
    eight, one = split_result(mesh_run, "mesh8/"), split_result(mesh_run, "single/")
    assert eight.keys() == one.keys() and len(one["losses"]) == 3
    assert "device_cache/metrics" in one  # the cache in device memory, compared below too
    with np.load(worker_inputs) as f:
        inputs = dict(f)
    assert_same_training(eight, one, inputs)
    assert not np.allclose(one["params/head/kernel"], inputs["params/head/kernel"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(mode, inputs, outs, env_of, timeout=SUBPROCESS_TIMEOUT):
    """`mode` of the worker on len(outs) processes joined on localhost; their logs, or a skip
    when the platform cannot run CPU multi-process collectives at all."""
    port, n = free_port(), len(outs)
    procs = [subprocess.Popen([sys.executable, str(WORKER), mode, str(inputs), str(outs[i]),
                               str(port), str(i), str(n)], env=env_of(i),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the processes timed out:\n" + "\n".join(
            p.communicate()[0][-3000:] for p in procs))
    codes = [p.returncode for p in procs]
    if codes == [worker.EXIT_UNSUPPORTED] * n:  # both failed to set up, nothing else went wrong
        reason = next(line for log in logs for line in log.splitlines()
                      if line.startswith("UNSUPPORTED"))
        pytest.skip(f"this platform cannot run CPU multi-process collectives: {reason}")
    assert codes == [0] * n, "\n\n".join(log[-5000:] for log in logs)
    return logs


def test_the_demo_backbone_found_by_process_0_reaches_every_process(tmp_path):
    """Hosts that do not share a cache: process 0 has the demo backbone, process 1 does not.
    Process 0 decides and sends its variables; process 1 does not pretrain alone over the
    global mesh (where it would wait for ever)."""
    from blockft_jax.inputs import weights
    from blockft_jax.search import plan, pretrained
    config = worker.demo_config()
    module = plan.build_module(config, 3).clone(num_classes=None)
    backbone = models.init_variables(module, (32, 32, 3), jax.random.key(7))
    caches = [tmp_path / f"cache{i}" for i in range(2)]
    weights.save_variables(caches[0] / "demo" / pretrained.demo_file_name(config), backbone)
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    logs = run_processes("demo", "-", outs,
                         lambda i: {**worker_env(1), "BLOCKFT_JAX_CACHE": str(caches[i])},
                         timeout=180)
    assert not any("Pretraining" in log for log in logs), logs
    expected = worker.flatten(jax.tree.map(np.asarray, backbone))
    for out in outs:
        with np.load(out) as f:
            got = dict(f)
        assert got.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_two_processes_match_one(mesh_run, worker_inputs, worker_split, engine_b1_cached,
                                 variables):
    outs = [worker_inputs.with_name(f"process{i}.npz") for i in range(2)]
    run_processes("multi", worker_inputs, outs, lambda i: worker_env(2))

    results = []
    for out in outs:
        with np.load(out) as f:
            results.append(dict(f))
    assert all(int(r.pop("device_count")) == 4 for r in results)  # 2 processes x 2 devices
    for key in results[0]:  # every process holds the same bits
        np.testing.assert_array_equal(results[1][key], results[0][key], err_msg=key)
    with np.load(worker_inputs) as f:
        inputs = dict(f)
    features = results[0].pop("features")
    assert_same_training(results[0], split_result(mesh_run, "single/"), inputs)
    # The prefix cache too: every process gets the features of all images.
    want = engine_b1_cached.features(variables, worker_split, BATCH).images
    np.testing.assert_allclose(features, want, rtol=1e-5, atol=1e-5)


# --- padded rows and host transfers ----------------------------------------------------------------

@pytest.mark.parametrize("traced_mode", [False, True], ids=["python_mode", "traced_mode"])
def test_batchnorm_batch_statistics_use_real_rows_only_like_keras_short_batch(traced_mode):
    """An epoch's last batch is padded (weight 0) to keep its shape; Keras trains on the short
    batch. A BN on batch statistics gives Keras's outputs and moving statistics for the real
    rows, whatever the padded rows hold."""
    import keras
    from blockft_jax.models import layers as L
    rng = np.random.default_rng(0)
    real = 5
    x = rng.normal(1.0, 3.0, (8, 4, 4, 6)).astype(np.float32)
    x[real:] = 1e4  # padding that would wreck the statistics if it counted
    weights = np.asarray([1.0] * real + [0.0] * (8 - real), np.float32)
    gamma, beta = rng.normal(1, 0.2, 6).astype(np.float32), rng.normal(0, 0.2, 6).astype(np.float32)
    mean, var = rng.normal(0, 0.5, 6).astype(np.float32), rng.uniform(0.5, 2, 6).astype(np.float32)
    keras_bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
    keras_bn.build(x.shape)
    keras_bn.set_weights([gamma, beta, mean, var])
    want = np.asarray(keras_bn(x[:real], training=True))
    want_mean, want_var = (np.asarray(v) for v in (keras_bn.moving_mean, keras_bn.moving_variance))

    bn = L.BatchNormalization(epsilon=1e-3, momentum=0.9, name="bn")
    variables = {"params": {"scale": gamma, "bias": beta}, "batch_stats": {"mean": mean, "var": var}}
    mode = jnp.asarray(True) if traced_mode else True
    got, updates = jax.jit(lambda v, x, w: bn.apply(v, x, L.BatchModes({"bn": mode}, w),
                                                    mutable=["batch_stats"]))(variables, x, weights)
    np.testing.assert_allclose(np.asarray(got)[:real], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], want_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], want_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["fed", "fed_cached", "device_cache"])
def test_train_loop_copies_no_host_data_quietly(engine_b1, model, variables, table, split, path):
    """Under jax.transfer_guard('disallow') the train loop and evaluation run: no step copies
    host data implicitly (the mask, BN modes, rng and batch index included); every transfer is
    an explicit, once-per-epoch or once-per-batch placement."""
    engine = engine_b1 if path == "fed" else make_engine(model, "block_1", cached=True,
                                                         table=table)
    inputs = split if path == "fed" else engine.features(variables, split, BATCH)
    if path == "device_cache":
        inputs = engine.to_device(inputs)
    mask, bn_modes = candidate(variables, table, CANDIDATE)
    cohort = cohort_of(engine)
    one = cohort_lib.Run(mask, bn_modes, seed=0)
    state = cohort.init(variables, [one])
    masks, bns, keys = cohort.stack_inputs([one])
    with jax.transfer_guard("disallow"):
        for epoch in range(2):
            state, losses, _, _ = cohort_lib.train_epoch(cohort, state, masks, bns, inputs,
                                                         BATCH, [0], epoch, keys, [True])
        evaluated = evaluate(engine, state, inputs)
        state = cohort.keep_best(state, [True])
    assert np.isfinite(losses[0]) and evaluated["predicted"].shape == (len(split),)
