"""The fine-tuning engine: one compiled, data-parallel train step for every candidate group.

What differs between candidates -- which parameters train (a boolean mask shaped like params)
and which BatchNorm layers use batch statistics -- enters the step as *data*, so the step is
traced and compiled once per search. The step starts at a unit boundary (`from_unit`): below
it, the backbone is frozen for every candidate of the search, so no gradient flows there, and its
output can be computed once per image and cached (`Engine.features`), in device memory when it
fits (`Engine.to_device`: then each step gathers its batch there; the host feeds nothing).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from blockft_jax import data as data_lib
from blockft_jax.models import Backbone
from blockft_jax.models.layers import BatchModes

log = logging.getLogger(__name__)


# --- optimizer --------------------------------------------------------------------------------

def masked(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs `inner` only where `mask` (an extra argument, i.e. data) is True. Frozen entries
    get zero gradients in and zero updates out, so their optimizer moments stay zero and the
    weight decay inside `inner` never reaches them."""

    def zero_where_frozen(tree, mask):
        return jax.tree.map(lambda t, m: jnp.where(m, t, jnp.zeros_like(t)), tree, mask)

    def update(updates, state, params=None, *, mask, **extra):
        # Frozen params enter as zeros too: otherwise a decay term (wd * param) would still
        # reach the inner state (e.g. SGD's momentum trace) although the output is masked.
        if params is not None:
            params = zero_where_frozen(params, mask)
        updates, state = inner.update(zero_where_frozen(updates, mask), state, params)
        return zero_where_frozen(updates, mask), state

    return optax.GradientTransformationExtraArgs(inner.init, update)


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


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformationExtraArgs:
    """Adam/AdamW or SGD with momentum from `cfg` (the config's `train` block). Weight decay
    applies to kernels only (never to BN parameters or biases) and only to trained params;
    'adamw' is 'adam' (with weight decay, both are AdamW: decoupled decay)."""
    lr = learning_rate_schedule(cfg, total_steps)
    wd = cfg.get("weight_decay", 0.0)

    def decays(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) == "kernel", params)

    name = cfg.get("optimizer", "adam")
    if name in ("adam", "adamw"):
        inner = optax.adamw(lr, weight_decay=wd, mask=decays) if wd else optax.adam(lr)
    elif name == "sgd":
        parts = [optax.add_decayed_weights(wd, mask=decays)] if wd else []
        inner = optax.chain(*parts, optax.sgd(lr, momentum=cfg.get("momentum", 0.9)))
    else:
        raise ValueError(f"train.optimizer={name!r}: use 'adam', 'adamw' or 'sgd'.")
    return masked(inner)


# --- the engine -------------------------------------------------------------------------------

def data_mesh(devices=None) -> Mesh:
    """All devices on one 'data' axis: batches are split across it, state is replicated."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), ("data",))


def default_prefix_chunk_bytes() -> int | None:
    """Micro-batching of the frozen prefix: on CPU, about half of a server's L3 cache per
    micro-batch (16 MiB; measured on a 32 MiB-L3 EPYC); off on accelerators."""
    return 16 * 2**20 if jax.default_backend() == "cpu" else None


def fits_on_device(nbytes: int, mesh: Mesh) -> bool:
    """Whether `nbytes`, replicated on every device of `mesh`, may live in device memory: on
    CPU always (device memory is the host memory the cache would take anyway); elsewhere up to a
    quarter of the smallest device's memory, leaving the rest to the train step."""
    devices = mesh.devices.reshape(-1)
    if all(d.platform == "cpu" for d in devices):
        return True
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices
              if d.process_index == jax.process_index()]
    return all(limits) and nbytes <= min(limits) // 4


@dataclasses.dataclass
class DeviceSplit:
    """A split held whole on every device (replicated): the prefix cache when it fits. Its
    batches are gathered on the device, by the step itself."""
    images: jax.Array  # the prefix's output
    labels: jax.Array

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclasses.dataclass
class Engine:
    """Compiled steps for one model and one lowest trainable unit (`from_unit`).

    `cached=True`: the steps take the prefix's output (from `features`) instead of images.
    """

    module: Backbone
    tx: optax.GradientTransformationExtraArgs
    from_unit: str
    mesh: Mesh
    cached: bool = False
    augment: dict | None = None   # {'flip': bool, 'crop': bool}, never with cached
    # The layer table: with it, the optimizer state, updates and norms cover only the
    # parameters at or above `from_unit` (the rest can never train in this engine), which
    # makes steps of top-of-network candidates much cheaper. Without it, all parameters.
    table: list | None = None
    # Run the frozen prefix (inference mode: images are independent) over micro-batches whose
    # activations stay in cache, instead of the whole batch at once: on CPU, where the wide
    # early layers are memory-bound, this measured 1.5-2x faster for the MobileNets (see
    # docs/performance.md). Bytes of the largest prefix activation per micro-batch and device;
    # None: off (the default elsewhere: accelerators want the whole batch).
    prefix_chunk_bytes: int | None = None
    compilations: dict = dataclasses.field(default_factory=lambda: {"train": 0, "eval": 0,
                                                                    "features": 0})

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
        repl = self.replicated = NamedSharding(self.mesh, P())
        batch = self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.train_step = jax.jit(self._train_step, donate_argnums=(0,),
                                  in_shardings=(repl, repl, repl, batch, batch, batch, repl),
                                  out_shardings=(repl, repl))
        self.eval_step = jax.jit(self._eval_step, in_shardings=(repl, batch, batch, batch),
                                 out_shardings=repl)
        # Replicated out: every process needs the whole global batch's features on its host
        # (a batch-sharded output spans other processes' devices: device_get would fail).
        self._features = jax.jit(self._features_fn, in_shardings=(repl, batch),
                                 out_shardings=repl)
        self._init_state = jax.jit(self._init_state_fn, in_shardings=(repl,),
                                   out_shardings=repl)
        # Steps over a cached split in device memory: the batch is gathered on the device.
        # (One step per call, not a lax.scan over the epoch: XLA:CPU ran a convolution's kernel
        # gradient inside a loop 50x slower than outside one, measured on ResNet50V2.)
        self.train_step_gathered = jax.jit(self._train_step_gathered, donate_argnums=(0,),
                                           in_shardings=(repl,) * 8, out_shardings=(repl, repl))
        self.eval_step_gathered = jax.jit(self._eval_step_gathered, in_shardings=(repl,) * 6,
                                          out_shardings=repl)

    # -- pure functions, traced once each ------------------------------------------------------

    def _prefix(self, variables, images):
        """Preprocess, and run the frozen units below `from_unit` (BN in inference mode)."""
        def run(x):
            x = data_lib.preprocess(x, self.preprocessing)
            if self.prefix_to is None:
                return x
            return self.module.apply(variables, x, train=False, to_unit=self.prefix_to)

        size = images.shape[0]
        chunk = self._prefix_chunk(size)
        if chunk is None:
            return run(images)
        # Chunk k holds rows k, k + n, k + 2n, ...: spread over the 'data' axis like the batch.
        n = size // chunk
        xs = images.reshape(chunk, n, *images.shape[1:]).swapaxes(0, 1)
        ys = jax.lax.map(run, xs)
        return ys.swapaxes(0, 1).reshape(size, *ys.shape[2:])

    def _prefix_chunk(self, size: int) -> int | None:
        """Rows per prefix micro-batch for a global batch of `size`, or None for one pass."""
        if self.prefix_chunk_bytes is None or self.prefix_to is None or self.table is None:
            return None
        names = self.module.unit_names()
        below = names[:names.index(self.from_unit)]
        largest = max(math.prod(r.output_shape[1:]) * 4 for r in self.table if r.unit in below)
        devices = self.mesh.shape["data"]
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
        return jax.lax.stop_gradient(self._prefix(variables, images))

    def _train_step(self, state, mask, bn_modes, images, labels, weights, rng):
        self.compilations["train"] += 1  # runs only while tracing: counts compilations
        log.info("Compiling the train step (from unit %s%s; compilation #%d)", self.from_unit,
                 ", cached prefix" if self.cached else "", self.compilations["train"])
        rng = jax.random.fold_in(rng, state["step"])
        aug_rng, dropout_rng = jax.random.split(rng)
        x = self._inputs(state, images, aug_rng)

        def loss_fn(live_params):
            params = {**state["params"], **live_params}
            logits, updates = self.module.apply(
                {"params": params, "batch_stats": state["batch_stats"]}, x,
                train=BatchModes(bn_modes, weights),
                from_unit=self.from_unit, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
            return _weighted_loss(logits, labels, weights), (logits, updates.get("batch_stats", {}))

        live = self._live(state["params"])
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(live)
        live_mask = self._live(mask)
        updates, opt_state = self.tx.update(grads, state["opt_state"], live, mask=live_mask)
        # where(), not params + 0: frozen parameters stay bitwise identical (even -0.0).
        new_live = jax.tree.map(lambda p, u, m: jnp.where(m, p + u.astype(p.dtype), p),
                                live, updates, live_mask)
        new_state = dict(state, params={**state["params"], **new_live}, batch_stats=batch_stats,
                         opt_state=opt_state, step=state["step"] + 1)
        metrics = {"loss": loss, **_counts(logits, labels, weights),
                   "grad_norm": optax.global_norm(grads),
                   "update_norm": optax.global_norm(updates),
                   "param_norm": optax.global_norm(new_live)}
        return new_state, metrics

    def _live(self, params: dict) -> dict:
        """The top-level entries (layers) of `params` this engine can train."""
        if self.live is None:
            return dict(params)
        return {k: v for k, v in params.items() if k in self.live}

    def _eval_step(self, variables, images, labels, weights):
        self.compilations["eval"] += 1
        x = images if self.cached else self._prefix(variables, images)
        logits = self.module.apply(variables, x, train=False, from_unit=self.from_unit)
        per_example = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels)
        return {"loss_sum": jnp.sum(per_example * weights), **_counts(logits, labels, weights),
                "predicted": jnp.argmax(logits, -1).astype(jnp.int32)}

    def _features_fn(self, variables, images):
        self.compilations["features"] += 1
        return self._prefix(variables, images)

    def _take(self, split_images, split_labels, order, weights, index):
        """Batch `index` of an epoch's `order` (batches, batch_size), gathered from a
        device-resident split and laid out like a fed batch."""
        batch = lambda x: jax.lax.with_sharding_constraint(x, self.batch_sharding)
        rows = order[index]
        return batch(split_images[rows]), batch(split_labels[rows]), batch(weights[index])

    def _train_step_gathered(self, state, mask, bn_modes, split_images, split_labels, order,
                             weights, rng):
        # Every epoch has len(order) steps and the state counts them: the batch index is the
        # step within the epoch, found on the device (the host sends nothing per step).
        index = state["step"] % order.shape[0]
        return self._train_step(state, mask, bn_modes,
                                *self._take(split_images, split_labels, order, weights, index),
                                rng)

    def _eval_step_gathered(self, variables, split_images, split_labels, order, weights, index):
        return self._eval_step(variables,
                               *self._take(split_images, split_labels, order, weights, index))

    def _init_state_fn(self, variables):
        params = jax.tree.map(jnp.copy, variables["params"])
        return {"params": params,
                "batch_stats": jax.tree.map(jnp.copy, variables.get("batch_stats", {})),
                "opt_state": self.tx.init(self._live(params)), "step": jnp.zeros((), jnp.int32)}

    # -- host-side helpers ---------------------------------------------------------------------

    def compile_steps(self, variables, mask, bn_modes, batch_size: int,
                      image_shape: tuple[int, int, int],
                      device_split_sizes: dict[str, int] | None = None) -> None:
        """Traces and compiles the train and eval steps (and init_state, for `variables` as
        they will be passed: host or device arrays) for global batches of `batch_size`
        images, without running them. JAX keeps what it compiled, so the first real step finds
        it ready; run on a background thread, compilation overlaps with other work (the prefix
        feature pass, other candidates' training). `mask` and `bn_modes` are any candidate's
        (only their structure matters). `device_split_sizes` ({'train': N, 'validation': N,
        ...}): the cached splits will be DeviceSplits of these sizes; compile the steps that
        gather their batches there instead of the fed ones."""
        if device_split_sizes is not None and not self.cached:
            raise ValueError("Only the prefix cache's splits live in device memory.")
        # Shardings as the real arguments will have them: they are part of JAX's cache key.
        repl, batch = self.replicated, self.batch_sharding
        like = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        def fed(size):  # a fed batch of `size` examples: images (or features), labels, weights
            images = jax.ShapeDtypeStruct((size, *image_shape), jnp.uint8)
            if self.cached:
                images = jax.eval_shape(self._prefix, variables, images)
            return (like(images, batch), jax.ShapeDtypeStruct((size,), jnp.int32, sharding=batch),
                    jax.ShapeDtypeStruct((size,), jnp.float32, sharding=batch))

        images, labels, weights = fed(batch_size)
        state = jax.tree.map(lambda x: like(x, repl),
                             jax.eval_shape(self._init_state_fn, variables))
        evaluated = {"params": state["params"], "batch_stats": state["batch_stats"]}
        # fit() places these on the devices, replicated, before the first step.
        mask, bn_modes = jax.tree.map(lambda x: like(x, repl), (mask, bn_modes))
        rng = like(jax.random.key(0), repl)
        self._init_state.lower(variables).compile()
        if device_split_sizes is None:
            self.train_step.lower(state, mask, bn_modes, images, labels, weights,
                                  rng).compile()
            self.eval_step.lower(evaluated, *fed(eval_batch_size(batch_size))).compile()
            return

        def split(n, size):  # a DeviceSplit's arrays and an epoch's order in batches of size
            steps = -(-n // size)
            return (like(jax.ShapeDtypeStruct((n, *images.shape[1:]), images.dtype), repl),
                    jax.ShapeDtypeStruct((n,), jnp.int32, sharding=repl),
                    jax.ShapeDtypeStruct((steps, size), jnp.int32, sharding=repl),
                    jax.ShapeDtypeStruct((steps, size), jnp.float32, sharding=repl))

        sizes = dict(device_split_sizes)
        self.train_step_gathered.lower(state, mask, bn_modes,
                                       *split(sizes.pop("train"), batch_size), rng).compile()
        index = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
        for n in sorted(set(sizes.values())):
            self.eval_step_gathered.lower(evaluated, *split(n, eval_batch_size(batch_size)),
                                          index).compile()

    def init_state(self, variables) -> dict:
        """A fresh train state (new buffers: the train step donates its state)."""
        return self._init_state(variables)

    def feature_bytes(self, images: int) -> int:
        """Bytes of the prefix cache (float32 features) of `images` images, from the layer
        table (no tracing): the output of the last layer of the unit below `from_unit`."""
        if self.table is None or self.prefix_to is None:
            raise ValueError("feature_bytes needs the layer table and a frozen prefix.")
        last = [r for r in self.table if r.unit == self.prefix_to][-1]
        return images * math.prod(last.output_shape[1:]) * 4

    def cache_fits_on_device(self, images: int) -> bool:
        """Whether this engine's prefix cache of `images` images goes into device memory."""
        return self.cached and fits_on_device(self.feature_bytes(images), self.mesh)

    def device_order(self, split: DeviceSplit, batch_size: int, shuffle_rng
                     ) -> tuple[jax.Array, jax.Array]:
        """`data.batch_order` of `split`, whole on every device: what the gathering steps
        index, sent once per epoch."""
        order, weights = data_lib.batch_order(len(split), batch_size, shuffle_rng=shuffle_rng)
        return self.replicate(order), self.replicate(weights)

    def place(self, tree):
        """`tree`'s arrays (host or device, PRNG keys too) whole on every device, by explicit
        transfers; arrays already there are kept as they are."""
        def put(x):
            if isinstance(x, jax.Array) and x.sharding == self.replicated:
                return x
            if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                                impl=jax.random.key_impl(x))
            return self.replicate(np.asarray(jax.device_get(x)))
        return jax.tree.map(put, tree)

    def replicate(self, x: np.ndarray) -> jax.Array:
        """A host array (the same on every process) whole on every device."""
        return jax.make_array_from_process_local_data(self.replicated, np.asarray(x), x.shape)

    def to_device(self, split: data_lib.Split) -> DeviceSplit:
        """A cached split (from `features`) moved into device memory, whole on every device."""
        if not self.cached:
            raise ValueError("Only the prefix cache's splits live in device memory.")
        return DeviceSplit(self.replicate(split.images),
                           self.replicate(split.labels.astype(np.int32)))

    def features(self, variables, split: data_lib.Split, batch_size: int) -> data_lib.Split:
        """The prefix's output for every image of `split`, computed once (the prefix cache).
        Kept in host memory as float32; batches of it feed the cached steps (or `to_device`
        moves it into device memory, where the steps gather their batches)."""
        if self.prefix_to is None:
            raise ValueError("No frozen prefix below the first unit: nothing to cache.")
        outs = []
        for batch in data_lib.batches(split, batch_size, shuffle_rng=None):
            gb = data_lib.global_batch(data_lib.process_slice(batch), self.mesh)
            out = self._features(variables, gb.images)
            outs.append(np.asarray(jax.device_get(out))[: int(batch.mask.sum())])
        return data_lib.Split(np.concatenate(outs), split.labels)


def _weighted_loss(logits, labels, weights):
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _counts(logits, labels, weights):
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"correct": jnp.sum(correct * weights), "count": jnp.sum(weights)}


def recalibrate_bn(module: Backbone, variables, images: np.ndarray) -> dict:
    """Sets every BN's moving statistics to the statistics of `images` under the current
    weights. Training from scratch with Keras's BN momentum (0.999) leaves the moving averages
    far from the real statistics after a few hundred steps; this makes inference-mode BN match
    the trained network (used for the demo's pretraining)."""
    x = data_lib.preprocess(jnp.asarray(images), type(module).preprocessing)
    _, state = jax.jit(lambda v, x: module.apply(v, x, train=True,
                                                 mutable=["batch_stats", "bn_batch_stats"]))(
        variables, x)
    return dict(variables, batch_stats=jax.tree.map(jnp.asarray, dict(state["bn_batch_stats"])))


# --- fitting one candidate --------------------------------------------------------------------

def finite(record: dict) -> bool:
    """Whether an epoch's history record is finite (not the epoch a run diverged)."""
    return math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])


def best_record(history: list[dict]) -> dict | None:
    """The one rule for a run's best epoch, used by training, resume and checkpoints alike:
    the highest validation accuracy among its finite epochs, the first of equal ones; None
    when no epoch is finite (a run that diverged in its first epoch has no best epoch)."""
    best = None
    for record in history:
        if finite(record) and (best is None or record["val_accuracy"] > best["val_accuracy"]):
            best = record
    return best


def diverged(history: list[dict]) -> bool:
    """Whether a run's history holds the epoch it diverged in (its last: it stopped there)."""
    return any(not finite(record) for record in history)


@dataclasses.dataclass
class FitResult:
    status: str                    # 'ok' or 'diverged'
    epochs: int
    best_epoch: int                # 1-based; 0 when no epoch finished
    val_accuracy: float            # at the best epoch (the figure used for ranking)
    val_loss: float                # at the best epoch
    test_accuracy: float | None    # at the best epoch; for the record, never for choosing
    final_val_accuracy: float
    train_seconds: float
    steps: int
    history: list[dict]
    best_variables: dict | None    # host copy of the variables at the best epoch
                                   # (None only when no epoch finished)
    final_variables: dict          # the variables after the last epoch
    # The predicted class of each example at the best epoch: {'validation': ..., 'test': ...}
    # (test None without a test split); None when no epoch finished.
    predictions: dict | None = None


# Evaluation takes batches this many times the training batch (`batch_size`, as callers pass
# it): it keeps no activations for a backward pass, and fewer, larger steps cost less per
# example (the demo's 395 validation images: 4 steps an epoch instead of 16).
EVAL_BATCH_MULTIPLE = 4


def eval_batch_size(batch_size: int) -> int:
    return batch_size * EVAL_BATCH_MULTIPLE


def evaluate(engine: Engine, variables, split: data_lib.Split | DeviceSplit,
             batch_size: int) -> dict:
    """{'accuracy', 'loss', 'predicted'}: the predicted class of every example, in order.
    `batch_size` is the training batch; evaluation's is `eval_batch_size` of it."""
    batch_size = eval_batch_size(batch_size)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    if isinstance(split, DeviceSplit):
        order, weights = engine.device_order(split, batch_size, shuffle_rng=None)
        outs = jax.device_get([
            engine.eval_step_gathered(variables, split.images, split.labels, order, weights,
                                      engine.replicate(np.int32(i)))
            for i in range(len(order))])
    else:
        outs = jax.device_get([
            engine.eval_step(variables, gb.images, gb.labels, gb.mask)
            for gb in (data_lib.global_batch(data_lib.process_slice(batch), engine.mesh)
                       for batch in data_lib.batches(split, batch_size, shuffle_rng=None))])
    for out in outs:  # one fetch: the steps run back to back
        for k in totals:
            totals[k] += float(out[k])
    n = max(totals["count"], 1.0)
    # Batches run in split order, the last one padded at its end: the first len(split) rows.
    predicted = np.concatenate([out["predicted"] for out in outs])[:len(split)]
    return {"accuracy": totals["correct"] / n, "loss": totals["loss_sum"] / n,
            "predicted": predicted}


def train_epoch(engine: Engine, state, mask, bn_modes, split: data_lib.Split | DeviceSplit,
                batch_size: int, seed: int, epoch: int, rng) -> tuple[dict, float, float]:
    """One pass over `split` in a (seed, epoch)-determined order: (state, loss, accuracy).
    A DeviceSplit's batches are gathered on the device; a host split's are fed."""
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    # The steps' inputs are placed on the devices once per epoch, explicitly (a no-op when they
    # are there already): no step copies host data (tested under transfer_guard('disallow')).
    mask, bn_modes, rng = engine.place((mask, bn_modes, rng))
    shuffle = np.random.default_rng([seed, epoch])
    metrics = []
    if isinstance(split, DeviceSplit):  # the epoch's order goes over once; no batch does
        order, weights = engine.device_order(split, batch_size, shuffle_rng=shuffle)
        for _ in range(len(order)):
            state, step_metrics = engine.train_step_gathered(
                state, mask, bn_modes, split.images, split.labels, order, weights, rng)
            metrics.append(step_metrics)
    else:
        for batch in data_lib.batches(split, batch_size, shuffle_rng=shuffle):
            gb = data_lib.global_batch(data_lib.process_slice(batch), engine.mesh)
            state, step_metrics = engine.train_step(state, mask, bn_modes, gb.images,
                                                    gb.labels, gb.mask, rng)
            metrics.append(step_metrics)
    # Fetched once per epoch, not per step: the host prepares the next step while the device
    # still runs this one.
    for m in jax.device_get(metrics):
        sums["loss"] += float(m["loss"]) * float(m["count"])
        sums["correct"] += float(m["correct"])
        sums["count"] += float(m["count"])
    count = max(sums["count"], 1.0)
    return state, sums["loss"] / count, sums["correct"] / count


def fit(engine: Engine, variables, mask, bn_modes, train: data_lib.Split | DeviceSplit,
        validation: data_lib.Split | DeviceSplit, test: data_lib.Split | DeviceSplit | None,
        *, epochs: int,
        batch_size: int, seed: int, state: dict | None = None, start_epoch: int = 0,
        history: list | None = None, best_variables: dict | None = None,
        on_epoch_end: Callable | None = None) -> FitResult:
    """Trains one candidate from `variables` (or resumes from `state` after `start_epoch`
    epochs, with the `history` and `best_variables` saved with it), validating after each
    epoch. The one owner of the best epoch: its variables are kept (a host copy) and handed to
    `on_epoch_end(epoch, state, history, best_variables)` for checkpointing."""
    state = engine.init_state(variables) if state is None else state
    history = list(history or [])
    rng = jax.random.key(seed)
    best = best_record(history)
    if best is not None and best_variables is None:
        raise ValueError("Resuming after a best epoch needs its variables (best_variables).")
    predictions = None
    # A run that diverged before an interruption is finished: it stays diverged.
    status, started = "diverged" if diverged(history) else "ok", time.perf_counter()
    for epoch in range(start_epoch, epochs if status == "ok" else start_epoch):
        state, train_loss, train_accuracy = train_epoch(engine, state, mask, bn_modes, train,
                                                        batch_size, seed, epoch, rng)
        current = {"params": state["params"], "batch_stats": state["batch_stats"]}
        val = evaluate(engine, current, validation, batch_size)
        record = {"epoch": epoch + 1, "train_loss": train_loss,
                  "train_accuracy": train_accuracy,
                  "val_accuracy": val["accuracy"], "val_loss": val["loss"],
                  "step": int(jax.device_get(state["step"]))}
        history.append(record)
        if not finite(record):
            status = "diverged"
        elif best_record(history) is record:
            predictions = {"validation": val["predicted"], "test": None}
            best = record
            best_variables = jax.device_get(current)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, state, history, best_variables)
        if status == "diverged":
            break
    if best_variables is not None and (predictions is None or test is not None):
        # The test split is measured once, from the best epoch's variables: the numbers that
        # epoch gives (the same compiled step over the same batches), without a test pass at
        # every improvement. Likewise the validation predictions of a best epoch that came
        # before a resume.
        placed = engine.place(best_variables)
        if predictions is None:
            predictions = {"validation": evaluate(engine, placed, validation,
                                                  batch_size)["predicted"], "test": None}
        if test is not None:
            tested = evaluate(engine, placed, test, batch_size)
            best["test_accuracy"], predictions["test"] = tested["accuracy"], tested["predicted"]
    final = history[-1] if history else {"val_accuracy": 0.0, "step": 0}
    best = best or {"epoch": 0, "val_accuracy": 0.0, "val_loss": float("nan")}
    return FitResult(status=status, epochs=len(history), best_epoch=best["epoch"],
                     val_accuracy=best["val_accuracy"], val_loss=best["val_loss"],
                     test_accuracy=best.get("test_accuracy"),
                     final_val_accuracy=final["val_accuracy"],
                     train_seconds=time.perf_counter() - started,
                     steps=int(final.get("step", 0)), history=history,
                     best_variables=best_variables,
                     final_variables={"params": state["params"],
                                      "batch_stats": state["batch_stats"]},
                     predictions=predictions)
