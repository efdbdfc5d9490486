"""The fine-tuning engine: a model's pure train and eval steps for every candidate group.

What differs between candidates -- which parameters train, at what share of the learning rate
(a mask of multipliers shaped like params, 0 frozen), and which BatchNorm layers use batch
statistics -- enters the step as *data*, so the step is traced and compiled once per search.
The step starts at a unit boundary (`from_unit`): below it, the backbone is frozen for every
candidate of the search, so no gradient flows there, and its output can be computed once per
image and cached (`Engine.features`), in device memory when it
fits (`Engine.to_device`: then each step gathers its batch there; the host feeds nothing).

The engine holds pure functions of one run; `cohort.py` vmaps and compiles them for K runs at
once (a single run is a cohort of one) and is the one training loop.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from blockft_jax.common import streams
from blockft_jax.inputs import data as data_lib
from blockft_jax.models import HEAD_UNIT, Backbone
from blockft_jax.models.layers import BatchModes

log = logging.getLogger(__name__)


# --- optimizer --------------------------------------------------------------------------------

def masked(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs `inner` where `mask` (an extra argument, i.e. data) is above 0 and scales its
    updates by it: a mask of learning-rate multipliers >= 0 per parameter (0 frozen, 1 the
    full rate; booleans act as 0 and 1, bitwise). Scaling the output is a per-tensor learning
    rate, weight decay included (as an optimizer's parameter group with its own rate). Frozen
    entries get zero gradients in and zero updates out, so their optimizer moments stay zero
    and the weight decay inside `inner` never reaches them."""

    def zero_where_frozen(tree, mask):
        return jax.tree.map(lambda t, m: jnp.where(m > 0, t, jnp.zeros_like(t)), tree, mask)

    def scaled(tree, mask):
        # t * 1 is t bitwise: a multiplier of 1 (or True) changes nothing.
        return jax.tree.map(lambda t, m: jnp.where(m > 0, t * jnp.asarray(m, t.dtype),
                                                   jnp.zeros_like(t)), tree, mask)

    inner = optax.with_extra_args_support(inner)

    def update(updates, state, params=None, *, mask, **extra):
        # Frozen params enter as zeros too: otherwise a decay term (wd * param) would still
        # reach the inner state (e.g. SGD's momentum trace) although the output is masked.
        if params is not None:
            params = zero_where_frozen(params, mask)
        updates, state = inner.update(zero_where_frozen(updates, mask), state, params,
                                      mask=mask)
        return scaled(updates, mask), state

    return optax.GradientTransformationExtraArgs(inner.init, update)


class AdamState(NamedTuple):
    adam: optax.ScaleByAdamState
    steps: dict  # per tensor: the steps it trained


def scale_by_adam(b1: float = 0.9, b2: float = 0.999,
                  eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
    """optax.scale_by_adam with its bias correction per tensor, from the steps that tensor
    trained (`mask` > 0), as PyTorch's Adam counts steps per parameter: a tensor unfrozen at a
    later epoch (gradual unfreezing) starts as a fresh Adam would, not with the run's step
    count. A tensor trained on every step gets optax's update itself (bitwise)."""
    inner = optax.scale_by_adam(b1, b2, eps)

    def init(params):
        return AdamState(inner.init(params),
                         jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params))

    def update(updates, state, params=None, *, mask, **extra):
        updates, adam = inner.update(updates, state.adam)
        steps = jax.tree.map(lambda n, m: jnp.where(m > 0, n + 1, n), state.steps, mask)

        def own(u, mu, nu, n):
            n = jnp.maximum(n, 1)  # a frozen tensor's update is dropped: no 0/0 to carry
            fresh = (mu / (1 - b1 ** n).astype(mu.dtype)) / (
                jnp.sqrt(nu / (1 - b2 ** n).astype(nu.dtype)) + eps)
            return jnp.where(n == adam.count, u, fresh)

        return jax.tree.map(own, updates, adam.mu, adam.nu, steps), AdamState(adam, steps)

    return optax.GradientTransformationExtraArgs(init, update)


def learning_rate_schedule(cfg, total_steps: int) -> optax.Schedule:
    warmup = int(round(cfg.get("warmup_epochs", 0.0) * total_steps / max(cfg.epochs, 1)))
    warmup = min(warmup, max(total_steps - 1, 0))
    if cfg.get("schedule", "constant") == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup,
                                                  max(total_steps, warmup + 1))
    if cfg.get("schedule", "constant") != "constant":
        raise ValueError(f"train.schedule={cfg.schedule!r}: use 'constant' or 'cosine'.")
    if warmup == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                                 optax.constant_schedule(cfg.learning_rate)], [warmup])


def total_steps(config, train_images: int) -> int:
    """The optimizer steps of one run of `config` on `train_images` images (the learning-rate
    schedule's length): its epochs of batches, the last one padded."""
    return config.train.epochs * -(-train_images // config.data.batch_size)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """Adam/AdamW or SGD with momentum from `cfg` (the config's `train` block). Weight decay
    applies to kernels only (never to BN parameters or biases) and only to trained params;
    'adamw' is 'adam' (with weight decay, both are AdamW: decoupled decay). Adam counts its
    steps per tensor (`scale_by_adam`)."""
    lr = learning_rate_schedule(cfg, total_steps)
    wd = cfg.get("weight_decay", 0.0)

    def decays(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) == "kernel", params)

    name = cfg.get("optimizer", "adam")
    if name in ("adam", "adamw"):
        # optax.adamw / optax.adam, with Adam's bias correction per tensor.
        parts = [optax.add_decayed_weights(wd, mask=decays)] if wd else []
        inner = optax.chain(scale_by_adam(), *parts, optax.scale_by_learning_rate(lr))
    elif name == "sgd":
        parts = [optax.add_decayed_weights(wd, mask=decays)] if wd else []
        inner = optax.chain(*parts, optax.sgd(lr, momentum=cfg.get("momentum", 0.9)))
    else:
        raise ValueError(f"train.optimizer={name!r}: use 'adam', 'adamw' or 'sgd'.")
    return masked(inner)


# --- the engine -------------------------------------------------------------------------------

def data_mesh(devices=None) -> Mesh:
    """All devices on one 'data' axis (a 'runs' axis of one): every run's batch is split across
    all of them."""
    return mesh(devices, runs=1)


def mesh(devices=None, *, runs: int = 1) -> Mesh:
    """Devices on a ('runs', 'data') grid: a cohort's runs are spread over 'runs' (they exchange
    nothing), each run's batch over 'data' (its gradients and BatchNorm statistics are summed
    there). On a TPU slice the grid follows the chips' physical order, so that a run's 'data'
    devices are neighbours (`mesh_utils.create_device_mesh`, as big_vision builds its meshes);
    elsewhere, and for part of a slice, it is the order given."""
    devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
    if runs < 1 or devices.size % runs:
        raise ValueError(f"runs={runs} does not divide the {devices.size} devices.")
    shape = (runs, devices.size // runs)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=list(devices),
                                             allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = devices.reshape(shape)
    return Mesh(grid, ("runs", "data"))


def layout(mesh_: Mesh) -> tuple[int, int]:
    """(runs, data): the sizes of a mesh's two axes."""
    return int(mesh_.shape["runs"]), int(mesh_.shape["data"])


def put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array, the same on every process, laid out as `sharding`: each process copies
    only the pieces its own devices hold."""
    x = np.asarray(x)
    return from_pieces(x.shape, sharding, lambda index: x[index])


def gather(source: np.ndarray, rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """`source[rows]` laid out as `sharding` (`rows`: indices, e.g. (runs, batch)), without
    building it whole: each process reads from `source` only the rows its own devices hold."""
    lead = rows.ndim

    def piece(index):
        return source[rows[index[:lead]]][(slice(None),) * lead + tuple(index[lead:])]
    return from_pieces((*rows.shape, *source.shape[1:]), sharding, piece)


def from_pieces(shape: tuple, sharding: NamedSharding, piece) -> jax.Array:
    """A global array of `shape` laid out as `sharding`, from `piece(index)`: the host data of
    each of this process's devices, copied there by one explicit transfer."""
    devices, indices = zip(*sharding.addressable_devices_indices_map(shape).items())
    pieces = jax.device_put([np.ascontiguousarray(piece(i)) for i in indices], list(devices))
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces)


def tree_bytes(tree) -> int:
    """Bytes of a tree's arrays (or shapes), from their shapes and dtypes alone."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def default_prefix_chunk_bytes() -> int | None:
    """Micro-batching of the frozen prefix: on CPU, about half of a server's L3 cache per
    micro-batch (16 MiB; measured on a 32 MiB-L3 EPYC); off on accelerators."""
    return 16 * 2**20 if jax.default_backend() == "cpu" else None


@dataclasses.dataclass
class DeviceSplit:
    """A split held whole on every device (replicated) when it fits: the prefix cache, or on
    an accelerator the uint8 images of an engine without one. Its batches are gathered on the
    device, by the step itself."""
    images: jax.Array  # the prefix's output, or uint8 images
    labels: jax.Array

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass
class Engine:
    """The pure steps of one run, for one model and one lowest trainable unit (`from_unit`).

    `cached=True`: the steps take the prefix's output (from `features`) instead of images.
    """

    module: Backbone
    tx: optax.GradientTransformationExtraArgs
    from_unit: str
    mesh: Mesh
    cached: bool = False
    augment: dict | None = None   # {'flip': bool, 'crop': bool}, never with cached
    # The layer table: with it, the optimizer state and updates cover only the parameters at
    # or above `from_unit` (the rest can never train in this engine), which makes steps of
    # top-of-network candidates much cheaper. Without it, all parameters.
    table: list | None = None
    # Run the frozen prefix (inference mode: images are independent) over micro-batches whose
    # activations stay in cache, instead of the whole batch at once: on CPU, where the wide
    # early layers are memory-bound, this measured 1.5-2x faster for the MobileNets (see
    # docs/performance.md). Bytes of the largest prefix activation per micro-batch and device;
    # None: off (the default elsewhere: accelerators want the whole batch).
    prefix_chunk_bytes: int | None = None
    # L2-SP's step (Li et al. 2018): each run's state holds its `penalty` (alpha, beta), and
    # the step adds alpha * (w - w0) to a backbone tensor's gradient and beta * w to the
    # head's, w0 the starting weights (`anchor`, held once per cohort). Off: a step without
    # them. A search turns it on for the engine that trains a strategy that penalises
    # (plan.Plan.anchored).
    anchored: bool = False
    compilations: dict = dataclasses.field(default_factory=lambda: {"features": 0})
    # The frozen layers as the last cohort placed them: (their host leaves, the device copy).
    _frozen: tuple | None = dataclasses.field(default=None, init=False, repr=False,
                                              compare=False)

    def __post_init__(self):
        if self.cached and self.augment and any(self.augment.values()):
            raise ValueError("The prefix cache needs augmentation off (the cached prefix "
                             "output is a fixed function of the un-augmented image).")
        names = self.module.unit_names()
        if self.from_unit not in names:
            raise ValueError(f"from_unit={self.from_unit!r} is not a unit: {names}")
        index = names.index(self.from_unit)
        self.prefix_to = names[index - 1] if index > 0 else None
        self.preprocessing = type(self.module).preprocessing
        self.live = None if self.table is None else frozenset(
            r.name for r in self.table if r.has_weights and names.index(r.unit) >= index)
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        # The prefix cache is computed once, over every device: its batches are split over all
        # of them whatever the runs' layout (the same devices, in the same order, on one axis).
        self.flat = Mesh(self.mesh.devices.reshape(1, -1), ("runs", "data"))
        flat_batch = NamedSharding(self.flat, P("data"))
        # Replicated out: every process needs the whole global batch's features on its host
        # (a batch-sharded output spans other processes' devices: device_get would fail).
        self._features = jax.jit(self._features_fn, in_shardings=(
            NamedSharding(self.flat, P()), flat_batch), out_shardings=NamedSharding(self.flat, P()))
        self._features_batch = flat_batch

    # -- which layers this engine trains -------------------------------------------------------

    def live_part(self, tree: dict) -> dict:
        """The top-level entries (layers) of `tree` (params, BN statistics, a mask) this
        engine can train."""
        if self.live is None:
            return dict(tree)
        return {k: v for k, v in tree.items() if k in self.live}

    def frozen_part(self, tree: dict) -> dict:
        """The entries of `tree` this engine never trains (the complement of `live_part`)."""
        return {} if self.live is None else {k: v for k, v in tree.items() if k not in self.live}

    # -- pure functions of one run (cohort.py vmaps and compiles them) -------------------------

    def prefix(self, variables, images, devices: int | None = None):
        """Preprocess, and run the frozen units below `from_unit` (BN in inference mode), on
        a batch split over `devices` (default: the mesh's 'data' axis)."""
        def run(x):
            x = data_lib.preprocess(x, self.preprocessing)
            if self.prefix_to is None:
                return x
            return self.module.apply(variables, x, train=False, to_unit=self.prefix_to)

        size = images.shape[0]
        chunk = self.prefix_chunk(size, devices)
        if chunk is None:
            return run(images)
        # Chunk k holds rows k, k + n, k + 2n, ...: spread over the 'data' axis like the batch.
        n = size // chunk
        xs = images.reshape(chunk, n, *images.shape[1:]).swapaxes(0, 1)
        ys = jax.lax.map(run, xs)
        return ys.swapaxes(0, 1).reshape(size, *ys.shape[2:])

    def prefix_chunk(self, size: int, devices: int | None = None) -> int | None:
        """Rows per prefix micro-batch for a global batch of `size` split over `devices`
        (default: the mesh's 'data' axis), or None for one pass."""
        if self.prefix_chunk_bytes is None or self.prefix_to is None or self.table is None:
            return None
        names = self.module.unit_names()
        below = names[:names.index(self.from_unit)]
        largest = max(math.prod(r.output_shape[1:]) * 4 for r in self.table if r.unit in below)
        devices = devices or self.mesh.shape["data"]
        if size % devices:
            return None
        per_device = max(1, self.prefix_chunk_bytes // largest)
        # The largest multiple of the device count that divides the batch (`devices` does).
        chunk = next(c for c in range(per_device * devices, 0, -devices) if size % c == 0)
        return chunk if chunk < size else None

    def _inputs(self, state, images, rng):
        if self.cached:
            return images
        if self.augment and any(self.augment.values()):
            images = data_lib.augment(rng, images, **self.augment)
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        return jax.lax.stop_gradient(self.prefix(variables, images))

    def _gradients(self, state, bn_modes, images, labels, weights, augment_rng, dropout_rng):
        """The loss of one batch and its gradients with respect to the live parameters:
        (loss, logits, new BN statistics, gradients, live parameters)."""
        x = self._inputs(state, images, augment_rng)

        def loss_fn(live_params):
            params = {**state["params"], **live_params}
            logits, updates = self.module.apply(
                {"params": params, "batch_stats": state["batch_stats"]}, x,
                train=BatchModes(bn_modes, weights),
                from_unit=self.from_unit, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
            return _weighted_loss(logits, labels, weights), (logits, updates.get("batch_stats", {}))

        live = self.live_part(state["params"])
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(live)
        return loss, logits, batch_stats, grads, live

    def anchor(self, params) -> dict:
        """L2-SP's w0: the live backbone tensors of `params` (the head is pulled to 0)."""
        return {k: v for k, v in self.live_part(params).items() if k != HEAD_UNIT}

    def penalised(self, grads, live, state):
        """`grads` plus L2-SP's penalty gradient: alpha * (w - w0) on the backbone, beta * w
        on the head (`state['penalty']` = (alpha, beta); `state['anchor']` = w0). A strength
        of 0 leaves a gradient bitwise as it was."""
        if not self.anchored:
            return grads
        alpha, beta = state["penalty"][0], state["penalty"][1]

        def pull(layer, grad, weight):
            strength = beta if layer == HEAD_UNIT else alpha
            start = (jax.tree.map(jnp.zeros_like, weight) if layer == HEAD_UNIT
                     else state["anchor"][layer])
            return jax.tree.map(lambda g, w, w0: jnp.where(
                strength > 0, g + (strength * (w.astype(jnp.float32) - w0)).astype(g.dtype), g),
                grad, weight, start)
        return {layer: pull(layer, grads[layer], live[layer]) for layer in grads}

    def train_step(self, state, mask, bn_modes, images, labels, weights, seed_key):
        """One step of one run: `state` holds its params and BN statistics (all, or the live
        ones over frozen ones merged in by the caller), optimizer state and step; `mask` (the
        learning-rate multipliers) and `bn_modes` are its candidate's (whole or live part);
        `seed_key` is the run's `streams.seed_key`. Returns (new state, metrics {'loss',
        'correct', 'count'})."""
        step = state["step"]
        augment_rng = streams.step_key(seed_key, streams.AUGMENT, step)
        dropout_rng = streams.step_key(seed_key, streams.DROPOUT, step)
        loss, logits, batch_stats, grads, live = self._gradients(
            state, bn_modes, images, labels, weights, augment_rng, dropout_rng)
        grads = self.penalised(grads, live, state)
        live_mask = self.live_part(mask)
        updates, opt_state = self.tx.update(grads, state["opt_state"], live, mask=live_mask)
        # where(), not params + 0: frozen parameters stay bitwise identical (even -0.0).
        new_live = jax.tree.map(lambda p, u, m: jnp.where(m > 0, p + u.astype(p.dtype), p),
                                live, updates, live_mask)
        new_state = dict(state, params={**state["params"], **new_live}, batch_stats=batch_stats,
                         opt_state=opt_state, step=step + 1)
        return new_state, {"loss": loss, **_counts(logits, labels, weights)}

    def gradient_norms(self, state, bn_modes, images, labels, weights, seed_key, index):
        """Auto-RGN's measurement on one batch (`index`, of the epoch starting at the state's
        step), from the run's current parameters: {'gradient': ||g||, 'parameter': ||theta||}
        per live parameter tensor. Nothing changes: BN statistics and the state stay as they
        are. Augmentation and dropout draw from a stream of their own."""
        key = jax.random.fold_in(streams.step_key(seed_key, streams.GRADIENT_NORMS,
                                                  state["step"]), index)
        _, _, _, grads, live = self._gradients(
            state, bn_modes, images, labels, weights,
            jax.random.fold_in(key, streams.AUGMENT), jax.random.fold_in(key, streams.DROPOUT))
        norm = lambda t: jnp.sqrt(jnp.sum(jnp.square(t.astype(jnp.float32))))
        return {"gradient": jax.tree.map(norm, grads), "parameter": jax.tree.map(norm, live)}

    def eval_step(self, variables, images, labels, weights):
        x = images if self.cached else self.prefix(variables, images)
        logits = self.module.apply(variables, x, train=False, from_unit=self.from_unit)
        per_example = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels)
        return {"loss_sum": jnp.sum(per_example * weights), **_counts(logits, labels, weights),
                "predicted": jnp.argmax(logits, -1).astype(jnp.int32)}

    def take(self, split_images, split_labels, order, weights, index):
        """Batch `index` of an epoch's `order` (batches, batch_size), gathered from a
        device-resident split and laid out like a fed batch."""
        batch = lambda x: jax.lax.with_sharding_constraint(x, self.batch_sharding)
        rows = order[index]
        return batch(split_images[rows]), batch(split_labels[rows]), batch(weights[index])

    def train_step_gathered(self, state, mask, bn_modes, split_images, split_labels, order,
                            weights, seed_key):
        # Every epoch has len(order) steps and the state counts them: the batch index is the
        # step within the epoch, found on the device (the host sends nothing per step).
        index = state["step"] % order.shape[0]
        return self.train_step(state, mask, bn_modes,
                               *self.take(split_images, split_labels, order, weights, index),
                               seed_key)

    def gradient_norms_gathered(self, state, bn_modes, split_images, split_labels, order,
                                weights, seed_key, index):
        return self.gradient_norms(state, bn_modes,
                                   *self.take(split_images, split_labels, order, weights, index),
                                   seed_key, index)

    def eval_step_gathered(self, variables, split_images, split_labels, order, weights, index):
        return self.eval_step(variables,
                              *self.take(split_images, split_labels, order, weights, index))

    def init_state(self, variables):
        """A fresh train state of `variables` (new buffers: the train step donates its state):
        the optimizer state covers the live parameters only."""
        params = jax.tree.map(jnp.copy, variables["params"])
        state = {"params": params,
                 "batch_stats": jax.tree.map(jnp.copy, variables.get("batch_stats", {})),
                 "opt_state": self.tx.init(self.live_part(params)),
                 "step": jnp.zeros((), jnp.int32)}
        if self.anchored:  # no penalty until the cohort sets the run's (alpha, beta)
            state["penalty"] = jnp.zeros((2,), jnp.float32)
        return state

    def _features_fn(self, variables, images):
        self.compilations["features"] += 1
        return self.prefix(variables, images, self.flat.devices.size)

    # -- host-side helpers ---------------------------------------------------------------------

    def feature_bytes(self, images: int) -> int:
        """Bytes of the prefix cache (float32 features) of `images` images, from the layer
        table (no tracing): the output of the last layer of the unit below `from_unit`."""
        if self.table is None or self.prefix_to is None:
            raise ValueError("feature_bytes needs the layer table and a frozen prefix.")
        last = [r for r in self.table if r.unit == self.prefix_to][-1]
        return images * math.prod(last.output_shape[1:]) * 4

    def place(self, tree):
        """`tree`'s arrays (host or device, PRNG keys too) whole on every device, by explicit
        transfers; arrays already there are kept as they are."""
        return place(tree, self.replicated)

    def place_frozen(self, tree):
        """`place` for the frozen layers, once: a cohort given the same host arrays as the
        last one shares its device copy (placement budgets one, not one per cohort)."""
        leaves = jax.tree.leaves(tree)
        if self._frozen is not None and len(self._frozen[0]) == len(leaves) and all(
                a is b for a, b in zip(self._frozen[0], leaves)):
            return self._frozen[1]
        placed = self.place(tree)
        self._frozen = (leaves, placed)
        return placed

    def replicate(self, x: np.ndarray) -> jax.Array:
        """A host array (the same on every process) whole on every device."""
        return jax.make_array_from_process_local_data(self.replicated, np.asarray(x), x.shape)

    def to_device(self, split: data_lib.Split) -> DeviceSplit:
        """A split moved into device memory, whole on every device: a cached one (from
        `features`), or the uint8 images of an engine without a cache."""
        return DeviceSplit(self.replicate(split.images),
                           self.replicate(split.labels.astype(np.int32)))

    def features(self, variables, split: data_lib.Split, batch_size: int) -> data_lib.Split:
        """The prefix's output for every image of `split`, computed once (the prefix cache).
        Kept in host memory as float32; batches of it feed the cached steps (or `to_device`
        moves it into device memory, where the steps gather their batches)."""
        if self.prefix_to is None:
            raise ValueError("No frozen prefix below the first unit: nothing to cache.")
        devices = self.flat.devices.size  # batches of a multiple of it: every device takes part
        outs = []
        for batch in data_lib.batches(split, -(-batch_size // devices) * devices,
                                      shuffle_rng=None):
            out = self._features(variables, put(batch.images, self._features_batch))
            outs.append(np.asarray(jax.device_get(out))[: int(batch.mask.sum())])
        return data_lib.Split(np.concatenate(outs), split.labels)


def place(tree, sharding: NamedSharding):
    """`tree`'s arrays (host or device, PRNG keys too) laid out as `sharding` says, by explicit
    transfers (a host array must be the same on every process); arrays already laid out so are
    kept as they are."""
    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        x = x if isinstance(x, np.ndarray) else np.asarray(jax.device_get(x))
        return jax.make_array_from_process_local_data(sharding, x, x.shape)
    return jax.tree.map(put, tree)


def _weighted_loss(logits, labels, weights):
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _counts(logits, labels, weights):
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"correct": jnp.sum(correct * weights), "count": jnp.sum(weights)}
