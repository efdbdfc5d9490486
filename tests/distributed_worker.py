"""Runs a few train steps of the tiny model in a fresh process, for tests/test_train.py.

JAX reads its device count and distributed setup once, before the first computation, so the
data-parallel and multi-process checks need processes of their own:

    python tests/distributed_worker.py mesh INPUT.npz OUTPUT.npz
        (with XLA_FLAGS=--xla_force_host_platform_device_count=8): trains on an 8-device mesh
        and on one device; writes both results (keys prefixed 'mesh8/' and 'single/').
    python tests/distributed_worker.py multi INPUT.npz OUTPUT.npz PORT PROCESS_ID NUM_PROCESSES
        one of NUM_PROCESSES processes on localhost, CPU collectives over gloo: trains on the
        global mesh, each process feeding its own rows; writes its copy of the results.
    python tests/distributed_worker.py demo - OUTPUT.npz PORT PROCESS_ID NUM_PROCESSES
        the same processes each ask for a demo backbone ($BLOCKFT_JAX_CACHE of their own) and
        write what they got.

INPUT.npz holds the initial variables ('params/...', 'batch_stats/...'), the images, the
labels and the candidate's layers, so every process starts from the same bits.
"""
import os
import sys

EXIT_UNSUPPORTED = 77  # the platform cannot run CPU multi-process collectives at all

MODEL = dict(name="mobilenet_v2", width=0.35, blocks=3, num_classes=3)
FROM_UNIT = "block_1"
BATCH_SIZE = 16
OPTIMIZER = dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=0.1, epochs=1)


def demo_config():
    """configs/tiny.py on a demo backbone that does not ship with the package (digits 0-2)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import tiny
    config = tiny.get_config()
    config.model.weights = "demo"
    config.demo.pretrain_classes = (0, 1, 2)
    return config


def flatten(tree, prefix=""):
    from flax import traverse_util
    return {prefix + k: v for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def load_inputs(path):
    import numpy as np
    from flax import traverse_util
    with np.load(path) as f:
        arrays = dict(f)
    variables = traverse_util.unflatten_dict(
        {k: v for k, v in arrays.items() if k.split("/")[0] in ("params", "batch_stats")},
        sep="/")
    layers = tuple(str(x) for x in arrays["layers"])
    return variables, arrays["images"], arrays["labels"], layers


def train_steps(mesh, variables, images, labels, layers):
    """The tiny model's candidate `layers`, SGD with weight decay, one epoch of batches of 16
    (the last one padded). Returns host copies of params, batch_stats and the losses."""
    import jax
    import ml_collections
    import numpy as np

    from blockft_jax.engine import cohort as cohort_lib
    from blockft_jax.inputs import data
    from blockft_jax.candidates import groups
    from blockft_jax import models
    from blockft_jax.engine import train

    module = models.create(MODEL["name"], width=MODEL["width"], blocks=MODEL["blocks"],
                           num_classes=MODEL["num_classes"])
    table = models.layer_table(module, images.shape[1:])
    tx = train.make_optimizer(ml_collections.ConfigDict(OPTIMIZER), 10)
    # prefix_chunk_bytes=1: the frozen prefix runs in micro-batches of one row per device.
    engine = train.Engine(module, tx, FROM_UNIT, mesh, table=table, prefix_chunk_bytes=1)
    mask = groups.param_mask(variables["params"], table, layers)
    bn_modes = groups.bn_modes(table, layers)
    cohort = cohort_lib.Cohort(engine, 1)  # one run: a cohort of one
    run = cohort_lib.Run(mask, bn_modes, seed=0)
    state = cohort.init(variables, [run])
    masks, bns, keys = cohort.stack_inputs([run])
    active = cohort.place_runs(np.ones(1, bool))
    runs, losses = state.runs, []
    split = data.Split(images, labels)
    for batch in data.batches(split, BATCH_SIZE, shuffle_rng=np.random.default_rng(0)):
        fed = [cohort.feed(x[None]) for x in (batch.images, batch.labels, batch.mask)]
        assert len(fed[0].sharding.device_set) == mesh.devices.size
        runs, metrics = cohort.train_step(state.shared, runs, masks, bns, *fed, keys, active)
        losses.append(_local(metrics["loss"])[0])
    assert cohort.compilations["train"] == 1, cohort.compilations

    one = jax.tree.map(lambda x: _local(x)[0], cohort_lib.live(runs))
    whole = cohort.whole(jax.tree.map(_local, state.shared), one)
    out = {**flatten(whole["params"], "params/"), **flatten(whole["batch_stats"], "batch_stats/")}
    out["losses"] = np.asarray(losses)
    out.update(device_cache_epoch(mesh, module, tx, table, variables, split, mask, bn_modes))
    return out


def device_cache_epoch(mesh, module, tx, table, variables, split, mask, bn_modes):
    """The same candidate trained one epoch on the prefix cache held in device memory
    (batches gathered on the devices), then evaluated there."""
    import jax
    import numpy as np

    from blockft_jax.engine import cohort as cohort_lib
    from blockft_jax.engine import train
    engine = train.Engine(module, tx, FROM_UNIT, mesh, cached=True, table=table)
    cache = engine.to_device(engine.features(variables, split, BATCH_SIZE))
    cohort = cohort_lib.Cohort(engine, 1)
    run = cohort_lib.Run(mask, bn_modes, seed=0)
    state = cohort.init(variables, [run])
    masks, bns, keys = cohort.stack_inputs([run])
    state, losses, accuracies, _ = cohort_lib.train_epoch(cohort, state, masks, bns, cache,
                                                          BATCH_SIZE, [0], 0, keys, [True])
    evaluated = cohort_lib.evaluate(cohort, state.shared, cohort_lib.live(state.runs), cache,
                                    BATCH_SIZE)[0]
    params = jax.tree.map(lambda x: _local(x)[0], state.runs["params"])
    out = dict(flatten(params, "device_cache/params/"))
    out["device_cache/metrics"] = np.asarray([losses[0], accuracies[0], evaluated["loss"],
                                              evaluated["accuracy"]])
    return out


def prefix_features(mesh, variables, images, labels):
    """The prefix cache's features (the output of the units below FROM_UNIT), on the host."""
    import ml_collections

    from blockft_jax.inputs import data
    from blockft_jax import models
    from blockft_jax.engine import train
    module = models.create(MODEL["name"], width=MODEL["width"], blocks=MODEL["blocks"],
                           num_classes=MODEL["num_classes"])
    tx = train.make_optimizer(ml_collections.ConfigDict(OPTIMIZER), 10)
    table = models.layer_table(module, images.shape[1:])
    engine = train.Engine(module, tx, FROM_UNIT, mesh, cached=True, table=table,
                          prefix_chunk_bytes=1)
    assert engine.prefix_chunk(BATCH_SIZE) == mesh.shape["data"]
    features = engine.features(variables, data.Split(images, labels), BATCH_SIZE)
    assert features.images.shape[0] == len(labels), features.images.shape
    return features.images


def _local(x):
    """This process's copy of a replicated global array (fully addressable or not)."""
    import numpy as np
    shards = x.addressable_shards
    first = np.asarray(shards[0].data)
    for shard in shards[1:]:  # every local replica holds the same bits
        assert np.array_equal(np.asarray(shard.data), first)
    return first


def main(argv):
    mode, inputs, output = argv[1:4]
    if mode == "mesh":
        import jax
        import numpy as np

        from blockft_jax.engine import train
        assert jax.device_count() == 8, jax.devices()
        variables, images, labels, layers = load_inputs(inputs)
        eight = train_steps(train.data_mesh(), variables, images, labels, layers)
        one = train_steps(train.data_mesh(jax.devices()[:1]), variables, images, labels, layers)
        np.savez(output, **{f"mesh8/{k}": v for k, v in eight.items()},
                 **{f"single/{k}": v for k, v in one.items()})
        return 0

    if mode in ("multi", "demo"):
        port, process_id, num_processes = (int(a) for a in argv[4:7])
        import jax
        import numpy as np
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                       num_processes=num_processes, process_id=process_id,
                                       initialization_timeout=120)
            from jax.experimental import multihost_utils
            seen = multihost_utils.process_allgather(np.asarray([jax.process_index()]))
        except Exception as e:  # setup only: a failure later is a bug, not the platform
            print(f"UNSUPPORTED: CPU multi-process collectives failed to start: "
                  f"{type(e).__name__}: {e}", flush=True)
            return EXIT_UNSUPPORTED
        assert sorted(np.asarray(seen).reshape(-1).tolist()) == list(range(num_processes)), seen
        assert jax.process_count() == num_processes
        assert jax.process_index() == process_id

    if mode == "demo":  # the demo backbone, found in process 0's cache only
        from blockft_jax.search import plan, pretrained
        config = demo_config()
        backbone = pretrained.demo_backbone(config, plan.build_module(config, 3))
        np.savez(output, **flatten(backbone))
        jax.distributed.shutdown()
        return 0

    if mode == "multi":
        from blockft_jax.engine import train
        variables, images, labels, layers = load_inputs(inputs)
        mesh = train.data_mesh()
        assert mesh.devices.size == jax.device_count() > jax.local_device_count()
        result = train_steps(mesh, variables, images, labels, layers)
        result["device_count"] = np.asarray(jax.device_count())
        result["features"] = prefix_features(mesh, variables, images, labels)
        np.savez(output, **result)
        jax.distributed.shutdown()
        return 0

    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main(sys.argv))
