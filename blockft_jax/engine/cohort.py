"""The training loop: K (candidate, seed) runs of one engine trained at once; a single run is a
cohort of one.

Vmapping the engine's train step over a leading *run* axis shares per-step dispatch and
per-epoch host work (evaluation, fetches) among K runs. Each run keeps its own trainable state
-- the engine's live parameters (`Engine.live`), their optimizer state, the live BatchNorms'
statistics, its step -- its own mask, BN modes and seed (`streams`), and its best epoch's live
variables, all on the device. The runs share, unbatched, the frozen variables (one copy, never
K) and the data (the prefix cache). Masks and BN modes are data: one compilation serves every
cohort of an engine of one size. The cohort size K is at most the engine's placed size
(`placement`); a short last cohort is padded with inactive runs whose state never changes and
whose results are dropped. Runs spread over the mesh's 'runs' axis, each run's batch over its
'data' axis. On a device-resident split an epoch is one program (the step scanned over its
batches), and so is an evaluation: one dispatch each, what the step gives batch by batch (the
same batches; float order where XLA compiles the loop's body otherwise).

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
from blockft_jax.engine import train, vmapped
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
# What a cohort compiles, by kind ('state': its init, keep-best and take-run programs).
PROGRAM_KINDS = ("train", "eval", "norms", "state")


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
    """The jitted, vmapped steps of `engine` (`vmapped.VmappedSteps`) for cohorts of `size`
    runs, laid out over the mesh, and the cohort's state on the devices: built, stepped, its
    best epochs kept, taken apart. Runs that are not `active` (padding, diverged, not yet at
    their resume epoch) keep their state unchanged."""

    engine: train.Engine
    size: int
    # The train and eval steps as `ahead.compile_steps` last compiled them (for their HLO, memory
    # plan and cost analysis).
    executables: dict = dataclasses.field(default_factory=dict)
    # Seconds `ahead` spent tracing and compiling each kind of program for this cohort ('state':
    # its init, keep-best and take-run programs).
    compile_seconds: dict = dataclasses.field(
        default_factory=lambda: dict.fromkeys(PROGRAM_KINDS, 0.0))

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"A cohort needs at least one run, got size={self.size}.")
        mesh = self.engine.mesh
        if self.size % mesh.shape["runs"]:
            raise ValueError(f"A cohort of {self.size} runs cannot spread over the mesh's "
                             f"{mesh.shape['runs']} 'runs' positions.")
        steps = self.steps = vmapped.VmappedSteps(self.engine, self.size)
        self.compilations = steps.compilations  # traces of each step, counted as they happen
        repl = self.replicated = NamedSharding(mesh, P())
        per_run = self.per_run = NamedSharding(mesh, P("runs"))
        # Fed batches: (runs, batch, ...): runs over 'runs', each run's batch over 'data'.
        run_batch = self.run_batch_sharding = NamedSharding(mesh, P("runs", "data"))
        batch = self.engine.batch_sharding
        self.train_step = jax.jit(
            steps.train_step, donate_argnums=(1,),
            in_shardings=(repl, per_run, per_run, per_run, run_batch, run_batch, run_batch,
                          per_run, per_run), out_shardings=(per_run, per_run))
        # On a device-resident split an epoch is one program, and so is an evaluation.
        self.train_epoch_gathered = jax.jit(
            steps.train_epoch_gathered, donate_argnums=(1,),
            in_shardings=(repl, per_run, per_run, per_run, repl, repl, per_run, per_run, per_run,
                          per_run), out_shardings=(per_run, per_run))
        # Metrics stay with their runs (no step gathers them across runs): `fetch` them.
        self.eval_step = jax.jit(steps.eval_step,
                                 in_shardings=(repl, per_run, batch, batch, batch),
                                 out_shardings=per_run)
        self.evaluate_gathered = jax.jit(
            steps.evaluate_gathered, in_shardings=(repl, per_run, repl, repl, repl, repl),
            out_shardings=per_run)
        # Auto-RGN's measurement: compiled on first use, by the engines that need it.
        self.gradient_norms_step = jax.jit(
            steps.norms_step, in_shardings=(repl, per_run, per_run, run_batch, run_batch,
                                            run_batch, per_run, repl), out_shardings=per_run)
        self.gradient_norms_step_gathered = jax.jit(
            steps.norms_step_gathered, in_shardings=(repl, per_run, per_run, repl, repl,
                                                     per_run, per_run, per_run, repl),
            out_shardings=per_run)
        self.init_runs_step = jax.jit(steps.init_runs, in_shardings=(per_run,),
                                      out_shardings=per_run)
        self.keep_best_step = jax.jit(steps.keep_best, donate_argnums=(0,),
                                      in_shardings=(per_run, per_run, per_run),
                                      out_shardings=per_run)
        self.take_run_step = jax.jit(lambda runs, i: jax.tree.map(lambda x: x[i], runs),
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

    whole = staticmethod(vmapped.whole)

    # -- building cohort states, and taking them apart -----------------------------------------

    def abstract_runs(self, variables) -> dict:
        """Shapes and dtypes of the runs' part of a cohort state for `variables` (nothing is
        computed): every run's live params and BN statistics, optimizer state and step."""
        stacked = lambda x: jax.ShapeDtypeStruct((self.size, *x.shape), x.dtype)
        return jax.eval_shape(self.steps.init_runs,
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
        state = self.init_runs_step(self.place_runs(jax.tree.map(stack, *starts)))
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
                           self.keep_best_step(state.best, live(state.runs), flags))

    def run_variables(self, state: CohortState, index: int) -> dict:
        """Run `index`'s current {'params', 'batch_stats'} (device arrays)."""
        run = self.take_run_step(live(state.runs), self.engine.replicate(np.int32(index)))
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
    (state, train losses, train accuracies, steps), one entry per run. On a DeviceSplit the
    epoch is one program; fed, one step per call, the host preparing the next step while the
    device runs this one. Metrics are fetched once, at the end."""
    orders, weights = epoch_orders(len(split), batch_size, seeds, epoch)
    active = cohort.place_runs(np.asarray(active, bool))
    if isinstance(split, train.DeviceSplit):  # the orders go over once; no batch does
        runs, metrics = cohort.train_epoch_gathered(
            state.shared, state.runs, masks, bn_modes, split.images, split.labels,
            *cohort.place_runs((orders, weights)), keys, active)
        metrics, steps = cohort.fetch((metrics, runs["step"]))
    else:
        runs, metrics = state.runs, []
        labels = split.labels.astype(np.int32)
        feed = cohort.feed
        for step in range(orders.shape[1]):
            rows = orders[:, step]
            runs, step_metrics = cohort.train_step(
                state.shared, runs, masks, bn_modes, feed(split.images, rows),
                feed(labels, rows), feed(weights[:, step]), keys, active)
            metrics.append(step_metrics)
        metrics, steps = cohort.fetch((metrics, runs["step"]))
        metrics = _runs_first(metrics)
    sums = [{"loss": 0.0, "correct": 0.0, "count": 0.0} for _ in range(cohort.size)]
    for i, s in enumerate(sums):  # each run's steps in order, summed on the host in float64
        for loss, correct, count in zip(metrics["loss"][i], metrics["correct"][i],
                                        metrics["count"][i]):
            s["loss"] += float(loss) * float(count)
            s["correct"] += float(correct)
            s["count"] += float(count)
    counts = [max(s["count"], 1.0) for s in sums]
    return (dataclasses.replace(state, runs=runs), [s["loss"] / c for s, c in zip(sums, counts)],
            [s["correct"] / c for s, c in zip(sums, counts)], [int(s) for s in steps])


def _runs_first(per_step: list[dict]) -> dict:
    """Host metrics of one step (or batch) each, [{name: (runs, ...)}], as the programs of a
    whole epoch give them: {name: (runs, steps, ...)}."""
    return {key: np.stack([m[key] for m in per_step], axis=1) for key in per_step[0]}


def evaluate(cohort: Cohort, shared: dict, live_variables: dict,
             split: data_lib.Split | train.DeviceSplit, batch_size: int,
             eval_batch_multiple: int = EVAL_BATCH_MULTIPLE) -> list[dict]:
    """Every run of the cohort on `split`, one vmapped step per batch (on a DeviceSplit all in
    one program), from the runs' stacked `live_variables` over the `shared` frozen ones:
    [{'accuracy', 'loss', 'predicted'}] per run (`predicted`: every example's class, in order).
    `batch_size` is the training batch; evaluation's is `eval_batch_multiple` of it."""
    e = cohort.engine
    batch_size *= eval_batch_multiple
    if isinstance(split, train.DeviceSplit):
        order, weights = data_lib.batch_order(len(split), batch_size, shuffle_rng=None)
        outs = cohort.fetch(cohort.evaluate_gathered(
            shared, live_variables, split.images, split.labels, e.replicate(order),
            e.replicate(weights)))
    else:
        # Each process reads only its own devices' slices of each batch.
        order, weights = data_lib.batch_order(len(split), batch_size, shuffle_rng=None)
        labels = split.labels.astype(np.int32)
        batch = e.batch_sharding
        outs = cohort.fetch([
            cohort.eval_step(shared, live_variables, train.gather(split.images, rows, batch),
                             train.gather(labels, rows, batch), train.put(w, batch))
            for rows, w in zip(order, weights)])
        outs = _runs_first(outs)
    results = []
    for i in range(cohort.size):
        totals = {key: sum(map(float, outs[key][i])) for key in ("loss_sum", "correct", "count")}
        n = max(totals["count"], 1.0)
        # Batches in split order, the last one padded at its end: the first len(split) rows.
        predicted = outs["predicted"][i].reshape(-1)[:len(split)]
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
