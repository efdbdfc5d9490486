"""The training loop: K (candidate, seed) runs of one engine trained at once; a single run is a
cohort of one.

Vmapping the engine's train step over a leading *run* axis shares per-step dispatch and
per-epoch host work (evaluation, fetches) among K runs. Each run keeps its own trainable state
-- the engine's live parameters (`Engine.live`), their optimizer state, the live BatchNorms'
statistics, its step -- its own mask, BN modes and seed (`streams`), and its best epoch's live
variables, all on the device. The runs share, unbatched, the frozen variables (one copy, never
K) and the data (the prefix cache). Masks and BN modes are data: one compilation serves every
cohort of an engine. The cohort size K is fixed per engine (`placement`); a short last cohort is
padded with inactive runs whose state never changes and whose results are dropped. Runs spread
over the mesh's 'runs' axis, each run's batch over its 'data' axis.

A run's results do not depend on its slot or its cohort-mates (bitwise; tested), so a resumed
search may regroup runs; cohorts of different sizes agree up to float rounding (batched
arithmetic may sum in another order, ~1e-7 relative per step).

    results = fit(Cohort(engine, 6), variables, [Run(mask, bn, seed), ...], train, validation,
                  test, epochs=30, batch_size=25)   # one FitResult per run
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from blockft_jax.common import streams
from blockft_jax.engine import train
from blockft_jax.inputs import data as data_lib

log = logging.getLogger(__name__)


# --- a run's history and its best epoch ----------------------------------------------------------

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


# Masks are learning-rate multipliers, this dtype for every strategy (one compilation).
MASK_DTYPE = np.float32

# Evaluation takes batches this many times the training batch unless placement decides
# otherwise: it keeps no activations for a backward pass, and fewer, larger steps cost less per
# example (the demo's 395 validation images: 4 steps an epoch instead of 16).
EVAL_BATCH_MULTIPLE = 4


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
                                   # (None when no epoch was finite)
    final_variables: dict          # the variables after the last epoch (device arrays)
    # The predicted class of each example at the best epoch: {'validation': ..., 'test': ...}
    # (test None without a test split); None without a best epoch.
    predictions: dict | None = None
    # Where the run stopped, as `Run.resume` takes it ({'state', 'best', 'history'}, host
    # copies), to go on later (fit(keep_state=True)); else None.
    stopped: dict | None = None


@dataclasses.dataclass
class Run:
    """One (candidate, seed) of a cohort. `mask`: its learning-rate multipliers (0 frozen).
    `variables`: its starting variables when they are not the cohort's (e.g. a head drawn from
    its seed); they may differ from the cohort's only in live layers. `resume`: where it
    stopped, as `checkpoint.Checkpoint.restore` gives it: {'state': its live state, 'best':
    its best epoch's live variables, 'history': [...]}. `mask_at`: for a mask that changes
    between epochs, `mask_at(epoch, norms)` -> (mask, BN modes) of an epoch (0-based), called
    at its start; `norms`: the run's `Cohort.gradient_norms` on its first `norm_batches`
    batches of that epoch (None when 0). Both follow from the epoch and the run's state, so a
    resumed run finds the masks it would have had."""
    mask: Any
    bn_modes: Any
    seed: int
    variables: dict | None = None
    resume: dict | None = None
    mask_at: Callable | None = None
    norm_batches: int = 0
    penalty: tuple[float, float] = (0.0, 0.0)  # L2-SP's (alpha, beta): train.Engine.anchored


@dataclasses.dataclass
class CohortState:
    """K runs: `shared` holds the frozen variables once ({'params', 'batch_stats'} of the layers
    outside Engine.live); `runs` each run's live params and BN statistics, optimizer state and
    step; `best` each run's live params and BN statistics at its best epoch (its start until it
    has one); both stacked on axis 0."""
    shared: dict
    runs: dict
    best: dict


def live(runs: dict) -> dict:
    """The {'params', 'batch_stats'} of a runs (or one run's) state."""
    return {"params": runs["params"], "batch_stats": runs["batch_stats"]}


@dataclasses.dataclass
class Cohort:
    """Jitted, vmapped train and eval steps of `engine` for cohorts of `size` runs.

    Built on the engine's pure step functions: per run, the engine's state is reassembled from
    the shared frozen variables and the run's live part, stepped, and split again. Runs that
    are not `active` (padding, diverged, not yet at their resume epoch) keep their state
    unchanged (`where`, so bitwise)."""

    engine: train.Engine
    size: int
    compilations: dict = dataclasses.field(
        default_factory=lambda: {"train": 0, "eval": 0, "norms": 0})
    # The train and eval steps as `compile_steps` last compiled them (for their HLO, memory
    # plan and cost analysis).
    executables: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"A cohort needs at least one run, got size={self.size}.")
        mesh = self.engine.mesh
        if self.size % mesh.shape["runs"]:
            raise ValueError(f"A cohort of {self.size} runs cannot spread over the mesh's "
                             f"{mesh.shape['runs']} 'runs' positions.")
        repl = self.replicated = NamedSharding(mesh, P())
        per_run = self.per_run = NamedSharding(mesh, P("runs"))
        # Fed batches: (runs, batch, ...): runs over 'runs', each run's batch over 'data'.
        run_batch = self.run_batch_sharding = NamedSharding(mesh, P("runs", "data"))
        batch = self.engine.batch_sharding
        self.train_step = jax.jit(
            self._train_fn, donate_argnums=(1,),
            in_shardings=(repl, per_run, per_run, per_run, run_batch, run_batch, run_batch,
                          per_run, per_run), out_shardings=(per_run, per_run))
        self.train_step_gathered = jax.jit(
            self._train_gathered_fn, donate_argnums=(1,),
            in_shardings=(repl, per_run, per_run, per_run, repl, repl, per_run, per_run, per_run,
                          per_run), out_shardings=(per_run, per_run))
        # Metrics stay with their runs (no step gathers them across runs): `fetch` them.
        self.eval_step = jax.jit(self._eval_fn, in_shardings=(repl, per_run, batch, batch, batch),
                                 out_shardings=per_run)
        self.eval_step_gathered = jax.jit(
            self._eval_gathered_fn, in_shardings=(repl, per_run, repl, repl, repl, repl, repl),
            out_shardings=per_run)
        # Auto-RGN's measurement: compiled on first use, by the engines that need it.
        self.gradient_norms_step = jax.jit(
            self._norms_fn, in_shardings=(repl, per_run, per_run, run_batch, run_batch,
                                          run_batch, per_run, repl), out_shardings=per_run)
        self.gradient_norms_step_gathered = jax.jit(
            self._norms_gathered_fn, in_shardings=(repl, per_run, per_run, repl, repl, per_run,
                                                   per_run, per_run, repl),
            out_shardings=per_run)
        self._init_runs = jax.jit(self._init_runs_fn, in_shardings=(per_run,),
                                  out_shardings=per_run)
        self._keep_best = jax.jit(self._keep_best_fn, donate_argnums=(0,),
                                  in_shardings=(per_run, per_run, per_run),
                                  out_shardings=per_run)
        self._take_run = jax.jit(lambda runs, i: jax.tree.map(lambda x: x[i], runs),
                                 in_shardings=(per_run, repl), out_shardings=repl)
        self._replicate = jax.jit(lambda tree: tree, out_shardings=repl)

    # -- the shared and the per-run part of a run's variables ----------------------------------

    def shared_part(self, variables) -> dict:
        """What every run of the cohort reads and none changes: the frozen layers' variables,
        and for an anchored engine L2-SP's starting weights of its live layers."""
        shared = {"params": self.engine.frozen_part(variables["params"]),
                  "batch_stats": self.engine.frozen_part(variables.get("batch_stats", {}))}
        if self.engine.anchored:
            shared["anchor"] = self.engine.anchor(variables["params"])
        return shared

    def live_variables(self, variables) -> dict:
        """The live {'params', 'batch_stats'} of a run's (whole) variables."""
        return {"params": self.engine.live_part(variables["params"]),
                "batch_stats": self.engine.live_part(variables.get("batch_stats", {}))}

    @staticmethod
    def whole(shared, run) -> dict:
        """{'params', 'batch_stats'} of one run: the shared frozen layers and its live ones."""
        return {"params": {**shared["params"], **run["params"]},
                "batch_stats": {**shared["batch_stats"], **run["batch_stats"]}}

    # -- pure functions, traced once each ------------------------------------------------------

    def _counted(self, kind: str, trace: Callable):
        """Traces `trace()` as one compilation of this cohort's `kind` step."""
        self.compilations[kind] += 1
        log.debug("Tracing the %s step from unit %s for %d run(s) (compilation #%d)", kind,
                  self.engine.from_unit, self.size, self.compilations[kind])
        return trace()

    def _stepped(self, shared, run, active, step_fn):
        state = {**self.whole(shared, run), "opt_state": run["opt_state"], "step": run["step"]}
        if self.engine.anchored:
            state.update(penalty=run["penalty"], anchor=shared["anchor"])
        new_state, metrics = step_fn(state)
        e = self.engine
        new_run = {"params": e.live_part(new_state["params"]),
                   "batch_stats": e.live_part(new_state["batch_stats"]),
                   "opt_state": new_state["opt_state"], "step": new_state["step"]}
        if self.engine.anchored:
            new_run["penalty"] = run["penalty"]
        new_run = jax.tree.map(lambda new, old: jnp.where(active, new, old), new_run, run)
        return new_run, metrics

    def _train_fn(self, shared, runs, masks, bn_modes, images, labels, weights, keys, active):
        def one(shared, run, mask, bn, images, labels, weights, key, active):
            return self._stepped(shared, run, active, lambda state: self.engine.train_step(
                state, mask, bn, images, labels, weights, key))

        # spmd_axis_name: the run axis is the mesh's 'runs' (sharding constraints keep it so).
        return self._counted("train", lambda: jax.vmap(one, in_axes=(
            None, 0, 0, 0, 0, 0, 0, 0, 0), spmd_axis_name="runs")(
                shared, runs, masks, bn_modes, images, labels, weights, keys, active))

    def _train_gathered_fn(self, shared, runs, masks, bn_modes, split_images, split_labels,
                           orders, weights, keys, active):
        # Each run has its own epoch order; the engine finds the batch index from its step.
        def one(shared, run, mask, bn, split_images, split_labels, order, weights, key, active):
            return self._stepped(shared, run, active, lambda state:
                                 self.engine.train_step_gathered(
                                     state, mask, bn, split_images, split_labels, order,
                                     weights, key))

        return self._counted("train", lambda: jax.vmap(one, in_axes=(
            None, 0, 0, 0, None, None, 0, 0, 0, 0), spmd_axis_name="runs")(
                shared, runs, masks, bn_modes, split_images, split_labels, orders, weights, keys,
                active))

    def _eval_fn(self, shared, live, images, labels, weights):
        # Evaluation has no order to shuffle: every run sees the same batch.
        def one(shared, live, images, labels, weights):
            return self.engine.eval_step(self.whole(shared, live), images, labels, weights)

        return self._counted("eval", lambda: jax.vmap(one, in_axes=(
            None, 0, None, None, None), spmd_axis_name="runs")(
                shared, live, images, labels, weights))

    def _eval_gathered_fn(self, shared, live, split_images, split_labels, order, weights,
                          index):
        def one(shared, live, split_images, split_labels, order, weights, index):
            return self.engine.eval_step_gathered(self.whole(shared, live), split_images,
                                                  split_labels, order, weights, index)

        return self._counted("eval", lambda: jax.vmap(one, in_axes=(
            None, 0, None, None, None, None, None), spmd_axis_name="runs")(
                shared, live, split_images, split_labels, order, weights, index))

    def _norms_fn(self, shared, runs, bn_modes, images, labels, weights, keys, index):
        def one(shared, run, bn, images, labels, weights, key):
            state = {**self.whole(shared, run), "step": run["step"]}
            return self.engine.gradient_norms(state, bn, images, labels, weights, key, index)

        return self._counted("norms", lambda: jax.vmap(one, in_axes=(
            None, 0, 0, 0, 0, 0, 0), spmd_axis_name="runs")(
                shared, runs, bn_modes, images, labels, weights, keys))

    def _norms_gathered_fn(self, shared, runs, bn_modes, split_images, split_labels, orders,
                           weights, keys, index):
        def one(shared, run, bn, split_images, split_labels, order, weights, key):
            state = {**self.whole(shared, run), "step": run["step"]}
            return self.engine.gradient_norms_gathered(state, bn, split_images, split_labels,
                                                       order, weights, key, index)

        return self._counted("norms", lambda: jax.vmap(one, in_axes=(
            None, 0, 0, None, None, 0, 0, 0), spmd_axis_name="runs")(
                shared, runs, bn_modes, split_images, split_labels, orders, weights, keys))

    def _init_runs_fn(self, live_variables):
        # Every run's fresh state from its own (stacked) live variables.
        return jax.vmap(self.engine.init_state)(live_variables)

    @staticmethod
    def _keep_best_fn(best, live, improved):
        pick = lambda new, old: jnp.where(improved.reshape((-1,) + (1,) * (old.ndim - 1)),
                                          new, old)
        return jax.tree.map(pick, live, best)

    # -- building cohort states, and taking them apart -----------------------------------------

    def abstract_runs(self, variables) -> dict:
        """Shapes and dtypes of the runs' part of a cohort state for `variables` (nothing is
        computed): every run's live params and BN statistics, optimizer state and step."""
        stacked = lambda x: jax.ShapeDtypeStruct((self.size, *x.shape), x.dtype)
        return jax.eval_shape(self._init_runs_fn,
                              jax.tree.map(stacked, self.live_variables(variables)))

    def _check_shared(self, variables, start) -> None:
        """A run's own starting variables must agree with the cohort's outside live layers
        (those are held once for all runs)."""
        shared = self.shared_part(variables)
        for collection in ("params", "batch_stats"):  # not L2-SP's anchor: runs start there
            frozen = shared[collection]
            theirs = start.get(collection, {})
            for layer, tree in frozen.items():
                mine = theirs.get(layer)
                same = mine is tree or (mine is not None and all(
                    a is b or np.array_equal(jax.device_get(a), jax.device_get(b))
                    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(tree))))
                if not same:
                    raise ValueError(f"A run's starting variables differ from the cohort's in "
                                     f"{collection}/{layer}, which the engine does not train.")

    def feed(self, source: np.ndarray, rows: np.ndarray | None = None) -> jax.Array:
        """`source[rows]` (`rows`: (runs, batch) indices into a host array that is the same on
        every process), or `source` itself (runs, batch, ...), laid out as the fed steps take
        it: runs over 'runs', each run's batch over 'data'. Each process reads only its own
        devices' runs and batch slices."""
        if rows is None:
            return train.put(source, self.run_batch_sharding)
        return train.gather(source, rows, self.run_batch_sharding)

    def fetch(self, tree):
        """Host copies of device arrays, whole on every process: arrays laid out over other
        processes' devices (a cohort's runs spread over hosts) are gathered first."""
        if not all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
            tree = self._replicate(tree)
        return jax.device_get(tree)

    def place_runs(self, tree):
        """A host (or device) tree stacked on axis 0, laid out over the 'runs' axis."""
        return train.place(tree, self.per_run)

    def init(self, variables, runs: Sequence[Run]) -> CohortState:
        """The cohort state of `runs` (exactly `size` of them): run i fresh from its
        `variables` (None: the cohort's `variables`), or where its `resume` stopped. The frozen
        layers come from `variables`, once."""
        if len(runs) != self.size:
            raise ValueError(f"{len(runs)} runs for a cohort of {self.size}.")
        for run in runs:
            if run.variables is not None and run.variables is not variables:
                self._check_shared(variables, run.variables)
        shared = self.engine.place_frozen(self.shared_part(variables))
        # Stacked on the host: the runs' live variables may live anywhere, and may differ.
        host = lambda tree: jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
        fetched = {}  # runs that start from the same variables fetch them once
        for run in runs:
            start = variables if run.variables is None else run.variables
            if id(start) not in fetched:
                fetched[id(start)] = host(self.live_variables(start))
        starts = [fetched[id(variables if r.variables is None else r.variables)] for r in runs]
        stack = lambda *xs: np.stack(xs)
        state = self._init_runs(self.place_runs(jax.tree.map(stack, *starts)))
        if self.engine.anchored:
            state["penalty"] = self.place_runs(np.asarray([r.penalty for r in runs], np.float32))
        elif any(any(r.penalty) for r in runs):
            raise ValueError("A run with a penalty (L2-SP) in a cohort of an engine without "
                             "one (train.Engine.anchored=False).")
        bests = starts
        if any(r.resume for r in runs):  # resuming: rare, so on the host
            fresh = self.fetch(state)
            states = [host(r.resume["state"]) if r.resume else jax.tree.map(lambda x: x[i], fresh)
                      for i, r in enumerate(runs)]
            bests = [host(r.resume["best"]) if r.resume else starts[i]
                     for i, r in enumerate(runs)]
            state = self.place_runs(jax.tree.map(stack, *states))
        # A buffer of its own (keep_best donates it), not the one the runs started from.
        return CohortState(shared, state, self.place_runs(jax.tree.map(stack, *bests)))

    def keep_best(self, state: CohortState, improved: Sequence[bool]) -> CohortState:
        """`state` with the runs that `improved` this epoch's live variables as their best,
        on the device (the previous best's buffers are reused)."""
        flags = self.place_runs(np.asarray(improved, bool))
        return CohortState(state.shared, state.runs,
                           self._keep_best(state.best, live(state.runs), flags))

    def run_variables(self, state: CohortState, index: int) -> dict:
        """Run `index`'s current {'params', 'batch_stats'} (device arrays)."""
        run = self._take_run(live(state.runs), self.engine.replicate(np.int32(index)))
        return self.whole(state.shared, run)

    def host_best(self, state: CohortState) -> list[dict]:
        """Every run's best {'params', 'batch_stats'} as host copies, fetched at once (the
        frozen entries are one host copy, shared by all runs)."""
        shared, best = self.fetch((live(state.shared), state.best))
        return [self.whole(shared, jax.tree.map(lambda x: np.array(x[i]), best))
                for i in range(self.size)]

    def stack_inputs(self, runs: Sequence[Run]) -> tuple[dict, dict, jax.Array]:
        """The runs' live masks, BN modes and seed keys, stacked on axis 0 and placed."""
        masks, bn_modes = self.place_masks([(r.mask, r.bn_modes) for r in runs])
        return masks, bn_modes, self.place_runs(jnp.stack([streams.seed_key(r.seed)
                                                           for r in runs]))

    def place_masks(self, inputs: Sequence[tuple]) -> tuple[dict, dict]:
        """Each run's (mask, BN modes), their live parts stacked on axis 0 and placed; masks
        as float32 multipliers whatever they came as (booleans too): one dtype, one
        compilation, for every strategy."""
        e = self.engine
        stack = lambda dtype: lambda *xs: np.stack([np.asarray(jax.device_get(x), dtype)
                                                    for x in xs])
        masks = jax.tree.map(stack(MASK_DTYPE), *[e.live_part(m) for m, _ in inputs])
        bn_modes = jax.tree.map(stack(bool), *[e.live_part(b) for _, b in inputs])
        return self.place_runs((masks, bn_modes))

    def gradient_norms(self, state: CohortState, bn_modes, split, batch_size: int,
                       seeds: Sequence[int], epoch: int, keys, batches: int) -> list[dict]:
        """Auto-RGN's measurement, for every run from its current parameters: on the first
        `batches` batches of its `epoch` order (all of them when the epoch has fewer), each
        live parameter tensor's gradient norm per batch and its norm. [{'gradient': {layer:
        {name: (batches,) norms}}, 'parameter': {layer: {name: norm}}}] per run (host)."""
        orders, weights = epoch_orders(len(split), batch_size, seeds, epoch)
        index = lambda b: self.engine.replicate(np.int32(b))
        count = min(batches, orders.shape[1])
        if isinstance(split, train.DeviceSplit):
            device_orders, device_weights = self.place_runs((orders, weights))
            outs = [self.gradient_norms_step_gathered(
                state.shared, state.runs, bn_modes, split.images, split.labels, device_orders,
                device_weights, keys, index(b)) for b in range(count)]
        else:
            labels = split.labels.astype(np.int32)
            outs = [self.gradient_norms_step(
                state.shared, state.runs, bn_modes, self.feed(split.images, orders[:, b]),
                self.feed(labels, orders[:, b]), self.feed(weights[:, b]), keys, index(b))
                for b in range(count)]
        outs = self.fetch(outs)
        per_batch = jax.tree.map(lambda *xs: np.stack(xs, axis=-1),
                                 *[o["gradient"] for o in outs])
        return [{"gradient": jax.tree.map(lambda x: x[i], per_batch),
                 "parameter": jax.tree.map(lambda x: x[i], outs[0]["parameter"])}
                for i in range(self.size)]

    # -- ahead-of-time compilation --------------------------------------------------------------

    def _abstract_arguments(self, variables, bn_modes, batch_size: int,
                            image_shape: tuple[int, int, int]) -> "_AbstractArguments":
        """The shapes and shardings the compiled steps are traced with (see `compile_steps`)."""
        e, k = self.engine, self.size
        stacked = lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype, sharding=self.per_run)
        images = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.uint8)
        if e.cached:
            images = jax.eval_shape(e.prefix, variables, images)
        like = lambda sharding: lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                sharding=sharding)
        fed = lambda shape, dtype: jax.ShapeDtypeStruct((k, batch_size, *shape), dtype,
                                                        sharding=self.run_batch_sharding)
        return _AbstractArguments(
            stacked=stacked, images=images,
            shared=jax.tree.map(like(self.replicated), self.shared_part(variables)),
            runs=jax.tree.map(like(self.per_run), self.abstract_runs(variables)),
            bn_modes=jax.tree.map(stacked, e.live_part(bn_modes)),
            keys=stacked(streams.seed_key(0)),
            index=jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated),
            fed_batch=(fed(images.shape[1:], images.dtype), fed((), jnp.int32),
                       fed((), jnp.float32)))

    def _abstract_split(self, images, n: int, size: int) -> tuple:
        """A DeviceSplit of `n` examples (images like `images`'s rows), and an epoch's order
        and weights in batches of `size`."""
        repl, steps = self.replicated, -(-n // size)
        return (jax.ShapeDtypeStruct((n, *images.shape[1:]), images.dtype, sharding=repl),
                jax.ShapeDtypeStruct((n,), jnp.int32, sharding=repl),
                jax.ShapeDtypeStruct((steps, size), jnp.int32, sharding=repl),
                jax.ShapeDtypeStruct((steps, size), jnp.float32, sharding=repl))

    def compile_steps(self, variables, mask, bn_modes, batch_size: int,
                      image_shape: tuple[int, int, int],
                      device_split_sizes: dict[str, int] | None = None,
                      eval_batch_multiple: int = EVAL_BATCH_MULTIPLE) -> dict:
        """Traces and compiles the cohort's steps (and its state init) for global batches of
        `batch_size` without running them: run on a background thread, compilation overlaps
        with other work, and the real calls find the programs ready (shapes and shardings are
        part of the cache key). `mask` and `bn_modes` are any candidate's (only their structure
        matters). `device_split_sizes` ({'train': N, 'validation': N, ...}): the splits
        will be DeviceSplits of these sizes; compile the steps that gather their batches there
        instead of the fed ones. Returns each program's memory ({'train': bytes, 'eval':
        bytes}: arguments, outputs and temporaries, less donated buffers) as XLA planned it,
        and the train step's flops per run ('flops')."""
        e, k = self.engine, self.size
        a = self._abstract_arguments(variables, bn_modes, batch_size, image_shape)
        live_vars = jax.tree.map(a.stacked, self.live_variables(variables))
        masks = jax.tree.map(lambda x: a.stacked(np.asarray(x, MASK_DTYPE)), e.live_part(mask))
        active = jax.ShapeDtypeStruct((k,), jnp.bool_, sharding=self.per_run)
        memory = {}
        self._init_runs.lower(live_vars).compile()
        self._keep_best.lower(live_vars, live_vars, active).compile()
        self._take_run.lower(live(a.runs), a.index).compile()
        eval_size = batch_size * eval_batch_multiple
        if device_split_sizes is None:
            compiled = self.train_step.lower(a.shared, a.runs, masks, a.bn_modes, *a.fed_batch,
                                             a.keys, active).compile()
            memory.update(train=program_bytes(compiled), flops=flops(compiled) / k)
            batch = lambda shape, dtype: jax.ShapeDtypeStruct((eval_size, *shape), dtype,
                                                              sharding=e.batch_sharding)
            evaluation = self.eval_step.lower(
                a.shared, live(a.runs), batch(a.images.shape[1:], a.images.dtype),
                batch((), jnp.int32), batch((), jnp.float32)).compile()
            memory["eval"] = program_bytes(evaluation)
            self.executables = {"train": compiled, "eval": evaluation}
            return memory

        sizes = dict(device_split_sizes)
        split_images, split_labels, order, weights = self._abstract_split(
            a.images, sizes.pop("train"), batch_size)
        compiled = self.train_step_gathered.lower(
            a.shared, a.runs, masks, a.bn_modes, split_images, split_labels, a.stacked(order),
            a.stacked(weights), a.keys, active).compile()
        memory.update(train=program_bytes(compiled), flops=flops(compiled) / k)
        evaluations = [self.eval_step_gathered.lower(
            a.shared, live(a.runs), *self._abstract_split(a.images, n, eval_size),
            a.index).compile() for n in sorted(set(sizes.values()))]
        memory["eval"] = max(map(program_bytes, evaluations))
        self.executables = {"train": compiled, "eval": evaluations[-1]}  # the largest split's
        return memory

    def compile_norms(self, variables, bn_modes, batch_size: int,
                      image_shape: tuple[int, int, int],
                      device_split_sizes: dict[str, int] | None = None) -> None:
        """Traces and compiles Auto-RGN's measurement step (`gradient_norms`) ahead, as
        `compile_steps` does the others (the same shapes, `bn_modes` any candidate's)."""
        a = self._abstract_arguments(variables, bn_modes, batch_size, image_shape)
        if device_split_sizes is None:
            self.gradient_norms_step.lower(a.shared, a.runs, a.bn_modes, *a.fed_batch, a.keys,
                                           a.index).compile()
            return
        images, labels, order, weights = self._abstract_split(
            a.images, device_split_sizes["train"], batch_size)
        self.gradient_norms_step_gathered.lower(
            a.shared, a.runs, a.bn_modes, images, labels, a.stacked(order), a.stacked(weights),
            a.keys, a.index).compile()


@dataclasses.dataclass(frozen=True)
class _AbstractArguments:
    """What every compiled step of a cohort is traced with: `stacked(x)` gives `x` a leading
    run axis sharded over 'runs'; `images` is a batch of the engine's inputs (the prefix
    cache's rows when it trains on them); `fed_batch` a fed step's (images, labels, weights)."""
    stacked: Callable
    images: Any
    shared: Any
    runs: Any
    bn_modes: Any
    keys: Any
    index: Any
    fed_batch: tuple


def flops(compiled) -> float:
    """The flops XLA counts for one run of a compiled program (0 when it does not say)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def program_bytes(compiled) -> int:
    """Device bytes a compiled program needs while it runs, as XLA planned it: its arguments,
    outputs and temporaries, less the buffers its outputs reuse (donated arguments)."""
    m = compiled.memory_analysis()
    if m is None:  # a backend without the analysis
        return 0
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


# --- one epoch, one evaluation ---------------------------------------------------------------

def epoch_orders(size: int, batch_size: int, seeds: Sequence[int], epoch: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Every run's batches in `epoch` (`streams.batch_order(seed, epoch)`): (orders, weights),
    each (runs, batches, batch_size)."""
    orders, weights = zip(*[data_lib.batch_order(size, batch_size,
                                                 shuffle_rng=streams.batch_order(seed, epoch))
                            for seed in seeds])
    return np.stack(orders), np.stack(weights)


def train_epoch(cohort: Cohort, state: CohortState, masks, bn_modes,
                split: data_lib.Split | train.DeviceSplit, batch_size: int,
                seeds: Sequence[int], epoch: int, keys, active: Sequence[bool]
                ) -> tuple[CohortState, list[float], list[float], list[int]]:
    """One epoch of every run, each in its own order (`streams.batch_order(seed, epoch)`):
    (state, train losses, train accuracies, steps), one entry per run. Metrics are fetched
    once, at the end: the host prepares the next step while the device runs this one."""
    orders, weights = epoch_orders(len(split), batch_size, seeds, epoch)
    active = cohort.place_runs(np.asarray(active, bool))
    runs, metrics = state.runs, []
    if isinstance(split, train.DeviceSplit):  # the orders go over once; no batch does
        device_orders, device_weights = cohort.place_runs((orders, weights))
        for _ in range(orders.shape[1]):
            runs, step_metrics = cohort.train_step_gathered(
                state.shared, runs, masks, bn_modes, split.images, split.labels, device_orders,
                device_weights, keys, active)
            metrics.append(step_metrics)
    else:
        labels = split.labels.astype(np.int32)
        feed = cohort.feed
        for step in range(orders.shape[1]):
            rows = orders[:, step]
            runs, step_metrics = cohort.train_step(
                state.shared, runs, masks, bn_modes, feed(split.images, rows),
                feed(labels, rows), feed(weights[:, step]), keys, active)
            metrics.append(step_metrics)
    metrics, steps = cohort.fetch((metrics, runs["step"]))
    k = cohort.size
    sums = [{"loss": 0.0, "correct": 0.0, "count": 0.0} for _ in range(k)]
    for m in metrics:
        for i in range(k):
            sums[i]["loss"] += float(m["loss"][i]) * float(m["count"][i])
            sums[i]["correct"] += float(m["correct"][i])
            sums[i]["count"] += float(m["count"][i])
    counts = [max(s["count"], 1.0) for s in sums]
    return (dataclasses.replace(state, runs=runs), [s["loss"] / c for s, c in zip(sums, counts)],
            [s["correct"] / c for s, c in zip(sums, counts)], [int(s) for s in steps])


def evaluate(cohort: Cohort, shared: dict, live_variables: dict,
             split: data_lib.Split | train.DeviceSplit, batch_size: int,
             eval_batch_multiple: int = EVAL_BATCH_MULTIPLE) -> list[dict]:
    """Every run of the cohort on `split`, one vmapped step per batch, from the runs'
    stacked `live_variables` over the `shared` frozen ones: [{'accuracy', 'loss', 'predicted'}]
    per run (`predicted`: every example's class, in order). `batch_size` is the training
    batch; evaluation's is `eval_batch_multiple` of it."""
    e = cohort.engine
    batch_size *= eval_batch_multiple
    if isinstance(split, train.DeviceSplit):
        order, weights = data_lib.batch_order(len(split), batch_size, shuffle_rng=None)
        order, weights = e.replicate(order), e.replicate(weights)
        outs = cohort.fetch([
            cohort.eval_step_gathered(shared, live_variables, split.images, split.labels, order,
                                      weights, e.replicate(np.int32(i)))
            for i in range(order.shape[0])])
    else:
        # Each process reads only its own devices' slices of each batch.
        order, weights = data_lib.batch_order(len(split), batch_size, shuffle_rng=None)
        labels = split.labels.astype(np.int32)
        batch = e.batch_sharding
        outs = cohort.fetch([
            cohort.eval_step(shared, live_variables, train.gather(split.images, rows, batch),
                             train.gather(labels, rows, batch), train.put(w, batch))
            for rows, w in zip(order, weights)])
    results = []
    for i in range(cohort.size):
        totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        for out in outs:
            for key in totals:
                totals[key] += float(out[key][i])
        n = max(totals["count"], 1.0)
        # Batches in split order, the last one padded at its end: the first len(split) rows.
        predicted = np.concatenate([out["predicted"][i] for out in outs])[:len(split)]
        results.append({"accuracy": totals["correct"] / n, "loss": totals["loss_sum"] / n,
                        "predicted": predicted})
    return results


# --- the loop ------------------------------------------------------------------------------------

def fit(cohort: Cohort, variables, runs: Sequence[Run],
        train_split: data_lib.Split | train.DeviceSplit,
        validation: data_lib.Split | train.DeviceSplit,
        test: data_lib.Split | train.DeviceSplit | None, *, epochs: int, batch_size: int,
        eval_batch_multiple: int = EVAL_BATCH_MULTIPLE, keep_state: bool = False,
        on_epoch_end: Callable | None = None) -> list[FitResult]:
    """Trains up to `cohort.size` runs at once, validating after each epoch: one FitResult per
    run, in order -- its history, its best epoch (`best_record`), the test accuracy at that
    epoch, a host copy of its best variables.

    Each run starts from its own `variables` if given, else from `variables`, whose frozen
    layers all runs share; or continues where its `resume` stopped. Fewer runs than the
    cohort's size are padded with inactive copies of the first (dropped from the results). A
    run whose train or validation loss is not finite stops there ('diverged'; its history ends
    with that epoch) while the others go on; a run that had diverged before a resume stays
    diverged. After each epoch, `on_epoch_end(epoch, state, histories)` gets the CohortState
    (each run's best live variables in `state.best`, on the device) and every real run's
    history: what a checkpoint stores. `train_seconds` of a run is the cohort's wall time
    until that run finished. `keep_state`: each result also says where its run stopped
    (`FitResult.stopped`), to go on later from there."""
    real = list(runs)
    k, n = cohort.size, len(real)
    if not 1 <= n <= k:
        raise ValueError(f"{n} runs for a cohort of {k}.")
    padded = real + [dataclasses.replace(real[0])] * (k - n)
    state = cohort.init(variables, padded)
    masks, bn_modes, keys = cohort.stack_inputs(padded)
    inputs = [(r.mask, r.bn_modes) for r in padded]  # host copies of what is placed
    seeds = [r.seed for r in padded]
    histories = [list((r.resume or {}).get("history") or []) for r in real]
    best = [best_record(h) for h in histories]
    status = ["diverged" if diverged(h) else "ok" for h in histories]
    predictions: list[dict | None] = [None] * n
    finished = [None] * n
    started = time.perf_counter()
    for epoch in range(min(map(len, histories)), epochs):
        active = [i < n and status[i] == "ok" and len(histories[i]) <= epoch for i in range(k)]
        if not any(active):
            break
        if any(r.mask_at is not None for r in padded):
            changed = epoch_inputs(cohort, state, padded, inputs, active, bn_modes, train_split,
                                   batch_size, seeds, epoch, keys)
            if changed is not None:  # placed where they change, not every epoch
                inputs = changed
                masks, bn_modes = cohort.place_masks(inputs)
        state, train_losses, train_accuracies, steps = train_epoch(
            cohort, state, masks, bn_modes, train_split, batch_size, seeds, epoch, keys, active)
        val = evaluate(cohort, state.shared, live(state.runs), validation, batch_size,
                       eval_batch_multiple)
        improved = [False] * k
        for i in (i for i in range(n) if active[i]):
            record = {"epoch": epoch + 1, "train_loss": train_losses[i],
                      "train_accuracy": train_accuracies[i],
                      "val_accuracy": val[i]["accuracy"], "val_loss": val[i]["loss"],
                      "step": steps[i]}
            histories[i].append(record)
            if not finite(record):
                status[i], finished[i] = "diverged", time.perf_counter() - started
            elif best_record(histories[i]) is record:
                best[i], improved[i] = record, True
                predictions[i] = {"validation": val[i]["predicted"], "test": None}
        if any(improved):  # on the device: the host copies nothing
            state = cohort.keep_best(state, improved)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, state, histories)
    total = time.perf_counter() - started
    tested = _evaluate_best(cohort, state, best, predictions, validation, test, batch_size,
                            eval_batch_multiple)
    return _results(cohort, state, histories, best, status, finished, predictions, tested,
                    total, keep_state)


def _results(cohort: Cohort, state: CohortState, histories, best, status, finished,
             predictions, tested, total: float, keep_state: bool) -> list[FitResult]:
    """`fit`'s FitResult per real run, once its epochs are done: the best variables to the
    host in one copy, and with `keep_state` each run's state to go on from."""
    n = len(histories)
    best_variables = cohort.host_best(state)  # the one copy of the best variables to the host
    stopped = [None] * n
    if keep_state:  # every run's state, to go on from where it stopped
        runs, best_live = cohort.fetch((state.runs, state.best))
        take = lambda tree, i: jax.tree.map(lambda x: np.array(x[i]), tree)
        stopped = [{"state": take(runs, i), "best": take(best_live, i),
                    "history": histories[i]} for i in range(n)]
    results = []
    for i in range(n):
        history = histories[i]
        final = history[-1] if history else {"val_accuracy": 0.0, "step": 0}
        b = best[i] or {"epoch": 0, "val_accuracy": 0.0, "val_loss": float("nan")}
        results.append(FitResult(
            status=status[i], epochs=len(history), best_epoch=b["epoch"],
            val_accuracy=b["val_accuracy"], val_loss=b["val_loss"],
            test_accuracy=tested[i], final_val_accuracy=final["val_accuracy"],
            train_seconds=finished[i] if finished[i] is not None else total,
            steps=int(final.get("step", 0)), history=history,
            best_variables=best_variables[i] if best[i] is not None else None,
            final_variables=cohort.run_variables(state, i), predictions=predictions[i],
            stopped=stopped[i]))
    return results


def epoch_inputs(cohort: Cohort, state: CohortState, runs: Sequence[Run],
                 current: list[tuple], active: Sequence[bool], bn_modes, split,
                 batch_size: int, seeds: Sequence[int], epoch: int, keys) -> list[tuple] | None:
    """Every run's (mask, BN modes) for `epoch`: `Run.mask_at`'s for the active runs that have
    one (from their Auto-RGN measurement when they take one), `current`'s for the others; None
    when nothing changed."""
    changing = [i for i, r in enumerate(runs) if active[i] and r.mask_at is not None]
    batches = max((runs[i].norm_batches for i in changing), default=0)
    measured = cohort.gradient_norms(state, bn_modes, split, batch_size, seeds, epoch, keys,
                                     batches) if batches else None
    out = list(current)
    for i in changing:
        norms = None
        if runs[i].norm_batches:  # its own first batches of the measured ones
            n = runs[i].norm_batches
            norms = {"gradient": jax.tree.map(lambda x: x[:n], measured[i]["gradient"]),
                     "parameter": measured[i]["parameter"]}
        out[i] = runs[i].mask_at(epoch, norms)
    same = all(np.array_equal(a, b) for new, old in zip(out, current)
               for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)))
    return None if same else out


def _evaluate_best(cohort, state, best, predictions, validation, test, batch_size,
                   eval_batch_multiple) -> list[float | None]:
    """From every run's best variables (on the device), in one cohort evaluation per split: the
    test split (each run's accuracy at its best epoch, and predictions), and the validation
    predictions of runs whose best epoch came before a resume. A run's numbers do not depend on
    its slot or cohort-mates, so they are those its best epoch gave. Returns the test
    accuracies (None without a test split or a best epoch)."""
    with_best = [i for i in range(len(best)) if best[i] is not None]
    missing = [i for i in with_best if predictions[i] is None]
    if missing:
        validated = evaluate(cohort, state.shared, state.best, validation, batch_size,
                             eval_batch_multiple)
        for i in missing:
            predictions[i] = {"validation": validated[i]["predicted"], "test": None}
    accuracies = [None] * len(best)
    if test is not None and with_best:
        tested = evaluate(cohort, state.shared, state.best, test, batch_size, eval_batch_multiple)
        for i in with_best:
            accuracies[i] = tested[i]["accuracy"]
            predictions[i]["test"] = tested[i]["predicted"]
    return accuracies
