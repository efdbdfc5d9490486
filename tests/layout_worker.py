"""A cohort of the tiny model on several CPU devices in several layouts, for
tests/test_layout.py (run with XLA_FLAGS=--xla_force_host_platform_device_count=8, or 4 for the
search; JAX reads it once):

    python tests/layout_worker.py hlo OUTPUT.json
        compiles the cohort's train and eval steps (fed and gathered) for each layout and
        writes every all-reduce's device groups, the mesh's 'data' groups (by mesh position),
        and any other collective.
    python tests/layout_worker.py search WORKDIR LAYOUT
        runs the tiny search (configs/tiny.py) with its layout forced to LAYOUT (e.g. 2x2 on
        4 devices).
    python tests/layout_worker.py steps OUTPUT.npz
        trains 8 runs for a few steps (an epoch of one batch each) in each layout and on one
        device; writes every step's losses per run, their validation losses after them and
        their heads' kernels.
"""
import json
import re
import sys

import numpy as np

LAYOUTS = ((8, 1), (4, 2), (1, 8))
RUNS = 8
BATCH = 16
STEPS = 4
FROM_UNIT = "block_1"
# Candidates of different kinds, two seeds each: head only, a conv, a BN, two blocks' layers.
CANDIDATES = ((), ("block_2_project",), ("block_1_depthwise_BN",),
              ("block_1_project", "block_2_expand"))


def setup():
    import jax
    import jax.numpy as jnp
    import ml_collections

    from blockft_jax import models
    from blockft_jax.engine import train
    module = models.create("mobilenet_v2", width=0.35, blocks=3, num_classes=3)
    shape = (32, 32, 3)
    table = models.layer_table(module, shape)
    variables = jax.device_get(jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, *shape))))
    cfg = ml_collections.ConfigDict({"optimizer": "adam", "learning_rate": 1e-2, "epochs": 1})
    tx = train.make_optimizer(cfg, 10)
    return module, table, variables, tx, shape


def engines(mesh, module, table, tx):
    from blockft_jax.engine import train
    return {"fed": train.Engine(module, tx, FROM_UNIT, mesh, table=table),
            "gathered": train.Engine(module, tx, FROM_UNIT, mesh, cached=True, table=table)}


def runs(table, variables):
    from blockft_jax.engine import cohort as cohort_lib
    from blockft_jax.candidates import groups
    return [cohort_lib.Run(groups.param_mask(variables["params"], table, layers),
                           groups.bn_modes(table, layers), seed)
            for seed in (0, 1) for layers in CANDIDATES]


def replica_groups(text: str) -> list[list[int]]:
    """The device groups of one HLO instruction's replica_groups: explicit ({{0,1},{2,3}}),
    iota ([2,2]<=[4], [2,2]<=[2,2]T(1,0)) or over a mesh's axes (mesh['a'=4,'b'=2] {'b'})."""
    explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", text)
    if explicit:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}",
                                                                          explicit.group(1))]
    iota = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if iota:
        shape = [int(x) for x in iota.group(1).split(",")]
        dims = [int(x) for x in iota.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if iota.group(3):
            ids = ids.transpose([int(x) for x in iota.group(3).split(",")])
        return ids.reshape(shape).tolist()
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", text)
    axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
    over = re.findall(r"'([^']+)'", mesh.group(2))
    names, dims = [a for a, _ in axes], [int(n) for _, n in axes]
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    inner = [names.index(a) for a in over]
    outer = [i for i in range(len(names)) if i not in inner]
    size = int(np.prod([dims[i] for i in inner]))
    return ids.transpose(outer + inner).reshape(-1, size).tolist()


def hlo(out):
    import jax

    from blockft_jax.engine import ahead
    from blockft_jax.engine import cohort as cohort_lib
    from blockft_jax.engine import train
    module, table, variables, tx, shape = setup()
    mask, bn = runs(table, variables)[0].mask, runs(table, variables)[0].bn_modes
    found = {}
    for layout in LAYOUTS:
        mesh = train.mesh(jax.devices(), runs=layout[0])
        positions = {d.id: i for i, d in enumerate(mesh.devices.reshape(-1))}
        data_groups = [[positions[d.id] for d in row] for row in mesh.devices]
        for kind, engine in engines(mesh, module, table, tx).items():
            cohort = cohort_lib.Cohort(engine, RUNS)
            sizes = {"train": 40, "validation": 20} if kind == "gathered" else None
            ahead.compile_steps(cohort, variables, mask, bn, BATCH, shape, sizes)
            texts = {step: compiled.as_text() for step, compiled in cohort.executables.items()}
            found[f"{layout[0]}x{layout[1]}/{kind}"] = {
                "data_groups": data_groups,
                "all_reduces": {step: [replica_groups(line) for line in text.splitlines()
                                       if re.search(r"\ball-reduce(-start)?\(", line)]
                                for step, text in texts.items()},
                "other_collectives": {step: re.findall(
                    r"\b(all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(",
                    text) for step, text in texts.items()}}
    with open(out, "w") as f:
        json.dump(found, f)


def steps(out):
    import jax

    from blockft_jax.engine import cohort as cohort_lib
    from blockft_jax.inputs import data
    from blockft_jax import models
    from blockft_jax.engine import train
    module, table, variables, tx, shape = setup()
    rng = np.random.default_rng(0)
    split = data.Split(rng.integers(0, 256, (BATCH, *shape), dtype=np.uint8),
                       rng.integers(0, 3, BATCH).astype(np.int64))
    members = runs(table, variables)
    result = {}
    meshes = {"single": train.mesh(jax.devices()[:1])}
    meshes.update({f"{r}x{d}": train.mesh(jax.devices(), runs=r) for r, d in LAYOUTS})
    for name, mesh in meshes.items():
        for kind, engine in engines(mesh, module, table, tx).items():
            cohort = cohort_lib.Cohort(engine, RUNS)
            inputs = split
            if kind == "gathered":
                inputs = engine.to_device(engine.features(variables, split, BATCH))
            state = cohort.init(variables, members)
            masks, bn_modes, keys = cohort.stack_inputs(members)
            losses = []
            for epoch in range(STEPS):  # one step an epoch: its loss is the step's
                state, epoch_losses, _, _ = cohort_lib.train_epoch(
                    cohort, state, masks, bn_modes, inputs, BATCH, [r.seed for r in members],
                    epoch, keys, [True] * RUNS)
                losses.append(epoch_losses)
            evaluated = cohort_lib.evaluate(cohort, state.shared, cohort_lib.live(state.runs),
                                            inputs, BATCH)
            result[f"{name}/{kind}/losses"] = np.asarray(losses)
            result[f"{name}/{kind}/val_loss"] = np.asarray([e["loss"] for e in evaluated])
            head = jax.tree.leaves(cohort.fetch(state.runs["params"][models.HEAD_UNIT]))
            result[f"{name}/{kind}/head"] = np.concatenate([x.reshape(RUNS, -1) for x in head],
                                                           axis=1)
    np.savez(out, **result)


def search(workdir, layout):
    """The tiny search (configs/tiny.py) in `layout` ('RxD'; 'auto': as placement decides)."""
    import logging

    from blockft_jax import launch
    from blockft_jax.engine import placement
    from configs import tiny
    if layout != "auto":
        forced = tuple(int(x) for x in layout.split("x"))
        placement.layout = lambda devices, runs, batch_size, fits=None: forced
    logging.getLogger().setLevel(logging.INFO)
    config = tiny.get_config()
    # Every digit of the three classes and a faster rate: runs that learn, so that float
    # order cannot flip their near-tied predictions (at chance, one image decides a ranking).
    config.data.train_per_class = None
    config.data.splits = (0.7, 0.15, 0.15)  # 380 training and 81 validation images
    config.train.learning_rate = 1e-2
    # Every engine and every kind of step input, not every strategy: the engines by depth's
    # strategies but top-k (its one run trains alone, two epochs in the engine's whole
    # program, as SubTuning's first round's three runs do: a padded cohort in every layout);
    # of the whole network's, full (no frozen variables), L2-SP (the anchor, an input of its
    # own) and Auto-RGN (per-tensor rates, measured with the norms step), which stand for
    # LLRD's rates and gradual's and LP-FT's masks that change between epochs (a third less
    # time on 8 devices: 62 s against 90 s, 2-core Xeon; without top-k, both searches 68 s
    # against 87 s, with 3.6 s of it the digits read without scikit-learn).
    config.search.strategies = ("classifier_only", "layerwise", "blocks", "window",
                                "subtuning", "full", "l2sp", "auto_rgn")
    sys.exit(launch.run(config, workdir))


if __name__ == "__main__":
    import os
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    {"hlo": hlo, "steps": steps, "search": search}[sys.argv[1]](*sys.argv[2:])
