"""Candidate-parallel training: K (candidate, seed) runs of one engine trained at once.

A small run (the demo's: 4 steps an epoch of a few-layer top) leaves the machine mostly to
overheads: per-step dispatch, and per-epoch host work (evaluation, fetches, best-epoch copies).
Vmapping the same train step over a leading *run* axis shares them among K runs (the demo's 38
top runs on a 2-core CPU: 3.1x faster at K=6 than one at a time). Each run keeps its own
trainable state -- the engine's live parameters (`Engine.live`), their optimizer state, the live
BatchNorms' statistics and its step counter -- its own mask, BN modes and seed (batch order and
dropout keys exactly as `train.fit` draws them). The runs share, unbatched (vmap
`in_axes=None`), the frozen variables (layers outside `Engine.live`: one copy, never K) and the
data (the prefix cache).

The mask and BN modes of each run are stacked on axis 0, as data: one compilation serves every
cohort of an engine. The cohort size K is fixed per engine (`cohort_size`); a short last cohort
is padded with inactive runs (repeats of its first run whose state is never updated and whose
results are dropped), so no cohort brings a new shape.

A run's results do not depend on its slot or its cohort-mates (bitwise; tested), so a resumed
search may regroup runs. They are train.fit's up to float rounding: the batched arithmetic sums
in another order (~1e-7 relative per step), and over the demo's 120 steps that moved the best
epoch or accuracies of 9 of its 38 top runs (by at most 6 of 395 validation images), as a change
of machine would.

    cohort = Cohort(engine, cohort_size(engine, variables, parallel=0, runs_left=len(runs),
                                        batch_size=25))
    results = fit_cohort(cohort, variables, [Run(mask, bn, seed), ...], train, validation,
                         test, epochs=30, batch_size=25)   # one train.FitResult per run
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from blockft_jax import data as data_lib
from blockft_jax import train

log = logging.getLogger(__name__)

MAX_COHORT = 64
CPU_MEMORY_SHARE = 0.25


@dataclasses.dataclass
class Run:
    """One (candidate, seed) of a cohort. `resume`: what `checkpoint.Checkpoint.restore`
    returns (and `train.fit` takes): {'state', 'start_epoch', 'history', 'best_variables'}.
    `variables`: this run's starting variables when they are not the cohort's (e.g. a head
    drawn from its seed); they may differ from the cohort's only in live layers."""
    mask: Any
    bn_modes: Any
    seed: int
    resume: dict | None = None
    variables: dict | None = None


@dataclasses.dataclass
class CohortState:
    """The train state of K runs: `shared` holds the frozen variables once ({'params',
    'batch_stats'} of the layers outside Engine.live); `runs` holds each run's live params,
    live BN statistics, optimizer state and step, stacked on axis 0."""
    shared: dict
    runs: dict


@dataclasses.dataclass
class Cohort:
    """Jitted, vmapped train and eval steps of `engine` for cohorts of `size` runs.

    Built on the engine's pure step functions: per run, the engine's state is reassembled from
    the shared frozen variables and the run's live part, stepped by `Engine._train_step` (or
    its gathering variant), and split again. Runs that are not `active` (padding, diverged,
    not yet at their resume epoch) keep their state unchanged (`where`, so bitwise)."""

    engine: train.Engine
    size: int
    compilations: dict = dataclasses.field(default_factory=lambda: {"train": 0, "eval": 0})

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"A cohort needs at least one run, got size={self.size}.")
        e = self.engine
        repl = self.replicated = e.replicated
        # Fed batches: (runs, batch, ...) split across devices along the batch axis.
        self.run_batch_sharding = NamedSharding(e.mesh, P(None, "data"))
        runs_batch = self.run_batch_sharding
        self.train_step = jax.jit(
            self._train_fn, donate_argnums=(1,),
            in_shardings=(repl, repl, repl, repl, runs_batch, runs_batch, runs_batch, repl, repl),
            out_shardings=(repl, repl))
        self.train_step_gathered = jax.jit(self._train_gathered_fn, donate_argnums=(1,),
                                           in_shardings=(repl,) * 10, out_shardings=(repl, repl))
        batch = e.batch_sharding
        self.eval_step = jax.jit(self._eval_fn, in_shardings=(repl, repl, batch, batch, batch),
                                 out_shardings=repl)
        self.eval_step_gathered = jax.jit(self._eval_gathered_fn, in_shardings=(repl,) * 7,
                                          out_shardings=repl)
        self._init_runs = jax.jit(self._init_runs_fn, in_shardings=(repl,), out_shardings=repl)
        self._take_run = jax.jit(lambda runs, i: jax.tree.map(lambda x: x[i], runs),
                                 in_shardings=(repl, repl), out_shardings=repl)

    # -- splitting an engine state into the shared and the per-run part ------------------------

    def _frozen(self, tree: dict) -> dict:
        live = self.engine.live
        return {} if live is None else {k: v for k, v in tree.items() if k not in live}

    def shared_part(self, variables) -> dict:
        return {"params": self._frozen(variables["params"]),
                "batch_stats": self._frozen(variables.get("batch_stats", {}))}

    def run_part(self, state) -> dict:
        """The per-run part of an Engine state: live params and BN statistics, optimizer
        state, step."""
        live = self.engine._live
        return {"params": live(state["params"]), "batch_stats": live(state["batch_stats"]),
                "opt_state": state["opt_state"], "step": state["step"]}

    @staticmethod
    def whole(shared, run) -> dict:
        """{'params', 'batch_stats'} of one run: the shared frozen layers and its live ones."""
        return {"params": {**shared["params"], **run["params"]},
                "batch_stats": {**shared["batch_stats"], **run["batch_stats"]}}

    def _engine_state(self, shared, run) -> dict:
        return {**self.whole(shared, run), "opt_state": run["opt_state"], "step": run["step"]}

    def _live_inputs(self, mask, bn_modes):
        """Only the live entries of a mask and BN modes: the step reads no others."""
        return self.engine._live(mask), self.engine._live(bn_modes)

    # -- pure functions, traced once each ------------------------------------------------------

    def _counted(self, kind: str, trace: Callable):
        """Traces `trace()` as one compilation of this cohort's `kind` step. The engine's pure
        function counts itself as it is traced; that count is the engine's own jitted steps',
        so it is taken back."""
        self.compilations[kind] += 1
        log.info("Compiling the cohort %s step (from unit %s, %d runs; compilation #%d)", kind,
                 self.engine.from_unit, self.size, self.compilations[kind])
        try:
            return trace()
        finally:
            self.engine.compilations[kind] -= 1

    def _stepped(self, shared, run, active, step_fn):
        new_state, metrics = step_fn(self._engine_state(shared, run))
        new_run = jax.tree.map(lambda new, old: jnp.where(active, new, old),
                               self.run_part(new_state), run)
        return new_run, metrics

    def _train_fn(self, shared, runs, masks, bn_modes, images, labels, weights, rngs, active):
        def one(shared, run, mask, bn, images, labels, weights, rng, active):
            return self._stepped(shared, run, active, lambda state: self.engine._train_step(
                state, mask, bn, images, labels, weights, rng))

        return self._counted("train", lambda: jax.vmap(one, in_axes=(
            None, 0, 0, 0, 0, 0, 0, 0, 0))(shared, runs, masks, bn_modes, images, labels,
                                         weights, rngs, active))

    def _train_gathered_fn(self, shared, runs, masks, bn_modes, split_images, split_labels,
                           orders, weights, rngs, active):
        # Each run has its own epoch order; the engine finds the batch index from its step.
        def one(shared, run, mask, bn, split_images, split_labels, order, weights, rng, active):
            return self._stepped(shared, run, active, lambda state:
                                 self.engine._train_step_gathered(
                                     state, mask, bn, split_images, split_labels, order,
                                     weights, rng))

        return self._counted("train", lambda: jax.vmap(one, in_axes=(
            None, 0, 0, 0, None, None, 0, 0, 0, 0))(shared, runs, masks, bn_modes,
                                                   split_images, split_labels, orders, weights,
                                                   rngs, active))

    def _eval_fn(self, shared, live, images, labels, weights):
        # Evaluation has no order to shuffle: every run sees the same batch.
        def one(shared, live, images, labels, weights):
            return self.engine._eval_step(self.whole(shared, live), images, labels, weights)

        return self._counted("eval", lambda: jax.vmap(one, in_axes=(
            None, 0, None, None, None))(shared, live, images, labels, weights))

    def _eval_gathered_fn(self, shared, live, split_images, split_labels, order, weights,
                          index):
        def one(shared, live, split_images, split_labels, order, weights, index):
            return self.engine._eval_step_gathered(self.whole(shared, live), split_images,
                                                   split_labels, order, weights, index)

        return self._counted("eval", lambda: jax.vmap(one, in_axes=(
            None, 0, None, None, None, None, None))(shared, live, split_images, split_labels,
                                                   order, weights, index))

    def _init_runs_fn(self, live_variables):
        # Every run's fresh state from its own (stacked) live variables.
        return jax.vmap(self.engine._init_state_fn)(live_variables)

    # -- building, stacking and taking apart cohort states -------------------------------------

    def abstract_runs(self, variables) -> dict:
        """Shapes and dtypes of the runs' part of a cohort state for `variables` (nothing is
        computed): every run's live params and BN statistics, optimizer state and step."""
        stacked = lambda x: jax.ShapeDtypeStruct((self.size, *x.shape), x.dtype)
        return jax.eval_shape(self._init_runs_fn,
                              jax.tree.map(stacked, self.live_variables(variables)))

    def live_variables(self, variables) -> dict:
        live = self.engine._live
        return {"params": live(variables["params"]),
                "batch_stats": live(variables.get("batch_stats", {}))}

    def _check_shared(self, variables, start) -> None:
        """A run's own starting variables must agree with the cohort's outside live layers
        (those are held once for all runs)."""
        for collection, frozen in self.shared_part(variables).items():
            theirs = start.get(collection, {})
            for layer, tree in frozen.items():
                mine = theirs.get(layer)
                same = mine is tree or (mine is not None and all(
                    a is b or np.array_equal(jax.device_get(a), jax.device_get(b))
                    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(tree))))
                if not same:
                    raise ValueError(f"A run's starting variables differ from the cohort's in "
                                     f"{collection}/{layer}, which the engine does not train.")

    def init(self, variables, starts: Sequence[dict | None] | None = None,
             states: Sequence[dict | None] | None = None) -> CohortState:
        """A cohort state: run i fresh from `starts[i]` (its starting variables; None: the
        cohort's `variables`), or resumed from `states[i]` (a plain Engine state, e.g. a
        restored checkpoint's) where that is not None. The frozen layers come from
        `variables`, once."""
        e = self.engine
        starts = list(starts or [None] * self.size)
        states = list(states or [None] * self.size)
        if len(starts) != self.size or len(states) != self.size:
            raise ValueError(f"{len(starts)} starts and {len(states)} states for a cohort of "
                             f"{self.size} runs.")
        for start in starts:
            if start is not None and start is not variables:
                self._check_shared(variables, start)
        shared = e.place(self.shared_part(variables))
        # Stacked on the host: the runs' live variables may live anywhere, and may differ.
        host = lambda tree: jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
        fetched = {}  # runs that start from the same variables fetch them once
        for s in starts:
            if id(s) not in fetched:
                fetched[id(s)] = host(self.live_variables(variables if s is None else s))
        live = [fetched[id(s)] for s in starts]
        stack = lambda *xs: np.stack(xs)
        runs = self._init_runs(e.place(jax.tree.map(stack, *live)))
        if any(state is not None for state in states):  # resuming: rare, so on the host too
            fresh = jax.device_get(runs)
            parts = [jax.tree.map(lambda x, i=i: x[i], fresh) if state is None
                     else host(self.run_part(state)) for i, state in enumerate(states)]
            runs = e.place(jax.tree.map(stack, *parts))
        return CohortState(shared, runs)

    def run_state(self, state: CohortState, index: int) -> dict:
        """Run `index`'s state as a plain Engine state (what `train.fit` and
        `checkpoint.Checkpoint` handle); its frozen entries are the shared arrays themselves."""
        run = self._take_run(state.runs, self.engine.replicate(np.int32(index)))
        return self._engine_state(state.shared, run)

    def host_variables(self, state: CohortState) -> list[dict]:
        """Every run's {'params', 'batch_stats'} as host copies, fetched at once (the frozen
        entries are one host copy, shared by all runs)."""
        shared, live = jax.device_get((state.shared, {"params": state.runs["params"],
                                                      "batch_stats": state.runs["batch_stats"]}))
        return [self.whole(shared, jax.tree.map(lambda x: np.array(x[i]), live))
                for i in range(self.size)]

    def stack_inputs(self, runs: Sequence[Run]) -> tuple[dict, dict, jax.Array]:
        """The runs' live masks, BN modes and dropout keys (`jax.random.key(seed)`, as
        train.fit draws them), stacked on axis 0 and placed on the devices."""
        live = [self._live_inputs(r.mask, r.bn_modes) for r in runs]
        stack = lambda *xs: np.stack([np.asarray(jax.device_get(x)) for x in xs])
        masks = jax.tree.map(stack, *[m for m, _ in live])
        bn_modes = jax.tree.map(stack, *[b for _, b in live])
        rngs = jnp.stack([jax.random.key(r.seed) for r in runs])
        return self.engine.place((masks, bn_modes, rngs))

    # -- ahead-of-time compilation --------------------------------------------------------------

    def compile_steps(self, variables, mask, bn_modes, batch_size: int,
                      image_shape: tuple[int, int, int],
                      device_split_sizes: dict[str, int] | None = None) -> None:
        """Traces and compiles the cohort's steps (and its state init) for global batches of
        `batch_size` without running them, like `Engine.compile_steps` (same arguments, same
        meaning): run on a background thread, compilation overlaps with other work, and the
        real calls find the programs ready (shapes and shardings are part of the cache key)."""
        e = self.engine
        if device_split_sizes is not None and not e.cached:
            raise ValueError("Only the prefix cache's splits live in device memory.")
        repl, k = self.replicated, self.size
        like = lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        stacked = lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype, sharding=repl)
        images = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.uint8)
        if e.cached:
            images = jax.eval_shape(e._prefix, variables, images)
        shared = jax.tree.map(lambda x: like(x, repl), self.shared_part(variables))
        live = jax.tree.map(stacked, self.live_variables(variables))
        runs = jax.tree.map(lambda x: like(x, repl), self.abstract_runs(variables))
        evaluated = {"params": runs["params"], "batch_stats": runs["batch_stats"]}
        masks, bns = jax.tree.map(lambda x: stacked(jnp.asarray(x)),
                                  self._live_inputs(mask, bn_modes))
        rngs = stacked(jax.random.key(0))
        active = jax.ShapeDtypeStruct((k,), jnp.bool_, sharding=repl)
        self._init_runs.lower(live).compile()
        self._take_run.lower(runs, jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)).compile()
        if device_split_sizes is None:
            fed = lambda shape, dtype: jax.ShapeDtypeStruct((k, batch_size, *shape), dtype,
                                                            sharding=self.run_batch_sharding)
            batch = e.batch_sharding
            self.train_step.lower(shared, runs, masks, bns, fed(images.shape[1:], images.dtype),
                                  fed((), jnp.int32), fed((), jnp.float32), rngs,
                                  active).compile()
            size = train.eval_batch_size(batch_size)
            eval_images = jax.ShapeDtypeStruct((size, *images.shape[1:]), images.dtype)
            self.eval_step.lower(shared, evaluated, like(eval_images, batch),
                                 jax.ShapeDtypeStruct((size,), jnp.int32, sharding=batch),
                                 jax.ShapeDtypeStruct((size,), jnp.float32,
                                                      sharding=batch)).compile()
            return

        def split(n, batch_size=batch_size):  # a DeviceSplit's arrays, an epoch's order, mask
            steps = -(-n // batch_size)
            return (jax.ShapeDtypeStruct((n, *images.shape[1:]), images.dtype, sharding=repl),
                    jax.ShapeDtypeStruct((n,), jnp.int32, sharding=repl),
                    jax.ShapeDtypeStruct((steps, batch_size), jnp.int32, sharding=repl),
                    jax.ShapeDtypeStruct((steps, batch_size), jnp.float32, sharding=repl))

        sizes = dict(device_split_sizes)
        split_images, split_labels, order, weights = split(sizes.pop("train"))
        self.train_step_gathered.lower(shared, runs, masks, bns, split_images, split_labels,
                                       stacked(order), stacked(weights), rngs,
                                       active).compile()
        index = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
        for n in sorted(set(sizes.values())):
            self.eval_step_gathered.lower(shared, evaluated,
                                          *split(n, train.eval_batch_size(batch_size)),
                                          index).compile()


# --- how many runs at once ---------------------------------------------------------------------

def _live_state_bytes(engine: train.Engine, variables) -> int:
    live = engine._live(variables["params"]), engine._live(variables.get("batch_stats", {}))
    return sum(np.dtype(x.dtype).itemsize * math.prod(x.shape) for x in jax.tree.leaves(live))


def run_bytes(engine: train.Engine, variables, batch_size: int) -> int:
    """Estimated device bytes one run of a cohort adds: its live parameters and BN statistics
    four times (the parameters, Adam's two moments, the best epoch's copy) plus its activations
    for one batch (the layer table's outputs at and above `from_unit`, float32, x3 for the
    forward pass, the gradients and the temporaries of the backward pass)."""
    if engine.table is None:
        raise ValueError("cohort_size needs the engine's layer table.")
    names = engine.module.unit_names()
    start = names.index(engine.from_unit)
    activations = sum(math.prod(r.output_shape[1:]) for r in engine.table
                      if names.index(r.unit) >= start)
    return 4 * _live_state_bytes(engine, variables) + 3 * 4 * batch_size * activations


def last_level_cache_bytes() -> int:
    """The CPU's largest cache (Linux sysfs), or 32 MiB where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=32 * 2**20)


def memory_budget(engine: train.Engine, cache_bytes: int = 0) -> int:
    """Bytes the runs of a cohort may take: on accelerators the smallest local device's
    `bytes_limit` less the prefix cache (whole on every device); on CPU a quarter of the host
    memory available now (the cache is already in it)."""
    if _on_cpu(engine):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(CPU_MEMORY_SHARE * available)
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in _local_devices(engine)]
    if not all(limits):
        return 0  # memory unknown: one run at a time
    return min(limits) - cache_bytes


def _local_devices(engine: train.Engine) -> list:
    return [d for d in engine.mesh.devices.reshape(-1) if d.process_index == jax.process_index()]


def _on_cpu(engine: train.Engine) -> bool:
    return all(d.platform == "cpu" for d in _local_devices(engine))


def cohort_size(engine: train.Engine, variables, parallel: int, runs_left: int, *,
                batch_size: int, cache_bytes: int = 0, budget_bytes: int | None = None,
                max_size: int = MAX_COHORT) -> int:
    """How many runs of `engine` train at once.

    `parallel >= 1`: min(parallel, runs_left). `parallel == 0`: as many as memory allows --
    `memory_budget` (accelerator: the smallest device's bytes_limit less the prefix cache
    `cache_bytes`; CPU: a quarter of the available host memory; or `budget_bytes` when given)
    divided by `run_bytes` (per run: live parameter and BN-statistic bytes x 4 for params, Adam's
    two moments and the best copy, plus one batch of activations above `from_unit`, float32,
    x3 for forward and backward) -- capped at `runs_left` and at `max_size`, and at least 1.
    On CPU it is also capped at the runs whose live state (x4: params, two moments, gradients)
    fits in the last-level cache: a step reads and writes all of it, and beyond that the
    per-run step time grows (demo, 2-core EPYC, 32 MiB L3, 4.5 MB per run: 4.9 ms per
    run-step at K=4-8, 7.1 ms at K=16-38)."""
    if parallel < 0:
        raise ValueError(f"parallel={parallel}: use 0 (as memory allows) or a cohort size >= 1.")
    runs_left = max(int(runs_left), 1)
    if parallel >= 1:
        size = min(parallel, runs_left)
        log.info("Cohort size %d (parallel=%d, %d runs)", size, parallel, runs_left)
        return size
    per_run = run_bytes(engine, variables, batch_size)
    budget = memory_budget(engine, cache_bytes) if budget_bytes is None else budget_bytes
    caps = {"memory": budget // max(per_run, 1), "runs left": runs_left, "maximum": max_size}
    if _on_cpu(engine):
        caps["CPU cache"] = last_level_cache_bytes() // max(
            4 * _live_state_bytes(engine, variables), 1)
    size = int(max(1, min(caps.values())))
    log.info("Cohort size %d: %.1f MB per run (live state x4 + one batch's activations x3), "
             "budget %.1f MB; caps %s", size, per_run / 2**20, budget / 2**20,
             {k: int(v) for k, v in caps.items()})
    return size


# --- training a cohort ----------------------------------------------------------------------

def _feed(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array (runs, batch, ...) whose batch axis is split across devices; on several
    processes each feeds its contiguous share of the batch axis (as data.process_slice)."""
    count, index = jax.process_count(), jax.process_index()
    size = x.shape[1]
    local = x[:, index * size // count:(index + 1) * size // count]
    return jax.make_array_from_process_local_data(sharding, np.ascontiguousarray(local), x.shape)


def train_epoch(cohort: Cohort, state: CohortState, masks, bn_modes,
                split: data_lib.Split | train.DeviceSplit, batch_size: int,
                seeds: Sequence[int], epoch: int, rngs, active: Sequence[bool]
                ) -> tuple[CohortState, list[float], list[float], list[int]]:
    """One epoch of every run, each in its own (seed, epoch) order, as train.train_epoch draws
    it: (state, train losses, train accuracies, steps), one entry per run. Metrics are fetched
    once, at the end."""
    e = cohort.engine
    orders, weights = zip(*[data_lib.batch_order(len(split), batch_size,
                                                 shuffle_rng=np.random.default_rng([seed, epoch]))
                            for seed in seeds])
    orders, weights = np.stack(orders), np.stack(weights)
    active = e.replicate(np.asarray(active, bool))
    runs, metrics = state.runs, []
    if isinstance(split, train.DeviceSplit):  # the orders go over once; no batch does
        device_orders, device_weights = e.replicate(orders), e.replicate(weights)
        for _ in range(orders.shape[1]):
            runs, step_metrics = cohort.train_step_gathered(
                state.shared, runs, masks, bn_modes, split.images, split.labels, device_orders,
                device_weights, rngs, active)
            metrics.append(step_metrics)
    else:
        labels = split.labels.astype(np.int32)
        for step in range(orders.shape[1]):
            rows = orders[:, step]
            feed = lambda x: _feed(x, cohort.run_batch_sharding)
            runs, step_metrics = cohort.train_step(
                state.shared, runs, masks, bn_modes, feed(split.images[rows]), feed(labels[rows]),
                feed(weights[:, step]), rngs, active)
            metrics.append(step_metrics)
    metrics, steps = jax.device_get((metrics, runs["step"]))
    k = cohort.size
    sums = [{"loss": 0.0, "correct": 0.0, "count": 0.0} for _ in range(k)]
    for m in metrics:  # the same float arithmetic as train.train_epoch, per run
        for i in range(k):
            sums[i]["loss"] += float(m["loss"][i]) * float(m["count"][i])
            sums[i]["correct"] += float(m["correct"][i])
            sums[i]["count"] += float(m["count"][i])
    counts = [max(s["count"], 1.0) for s in sums]
    return (CohortState(state.shared, runs), [s["loss"] / c for s, c in zip(sums, counts)],
            [s["correct"] / c for s, c in zip(sums, counts)], [int(s) for s in steps])


def evaluate(cohort: Cohort, state: CohortState, split: data_lib.Split | train.DeviceSplit,
             batch_size: int) -> list[dict]:
    """train.evaluate for every run of the cohort, one vmapped step per batch:
    [{'accuracy', 'loss', 'predicted'}] per run (`predicted`: every example's class, in
    order). `batch_size` is the training batch; evaluation's is train.eval_batch_size of it."""
    e = cohort.engine
    batch_size = train.eval_batch_size(batch_size)
    live = {"params": state.runs["params"], "batch_stats": state.runs["batch_stats"]}
    if isinstance(split, train.DeviceSplit):
        order, weights = e.device_order(split, batch_size, shuffle_rng=None)
        outs = jax.device_get([
            cohort.eval_step_gathered(state.shared, live, split.images, split.labels, order,
                                      weights, e.replicate(np.int32(i)))
            for i in range(len(order))])
    else:
        outs = jax.device_get([
            cohort.eval_step(state.shared, live, gb.images, gb.labels, gb.mask)
            for gb in (data_lib.global_batch(data_lib.process_slice(batch), e.mesh)
                       for batch in data_lib.batches(split, batch_size, shuffle_rng=None))])
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


def fit_cohort(cohort: Cohort, variables, runs: Sequence[Run | tuple],
               train_split: data_lib.Split | train.DeviceSplit,
               validation: data_lib.Split | train.DeviceSplit,
               test: data_lib.Split | train.DeviceSplit | None, *, epochs: int,
               batch_size: int, on_epoch_end: Callable | None = None) -> list[train.FitResult]:
    """Trains up to `cohort.size` runs at once, each as `train.fit` would train it alone:
    one `train.FitResult` per run, in order -- its own history, its best epoch (strictly higher
    validation accuracy wins), test accuracy at that epoch, host copy of its best variables.

    `runs`: `Run`s or (mask, bn_modes, seed[, resume[, variables]]) tuples: each starts from
    its own `variables` if given, else from `variables`, whose frozen layers all runs share.
    Fewer runs than the cohort's
    size are padded with inactive copies of the first (dropped from the results). A run whose
    train or validation loss is not finite stops there ('diverged'; its history ends with that
    epoch) while the others go on. After each epoch, `on_epoch_end(epoch, state, histories,
    best_variables)` gets the CohortState (run i's Engine state: `cohort.run_state(state, i)`)
    and per real run its history and best variables: with them, each run can be checkpointed
    as train.fit's hook would (a diverged run's history ends with a non-finite record).
    `train_seconds` of a run is the cohort's wall time until that run finished."""
    real = [r if isinstance(r, Run) else Run(*r) for r in runs]
    k = cohort.size
    if not 1 <= len(real) <= k:
        raise ValueError(f"{len(real)} runs for a cohort of {k}.")
    padded = real + [real[0]] * (k - len(real))
    resumes = [r.resume or {} for r in real]
    state = cohort.init(variables, [r.variables for r in padded],
                        [r.get("state") for r in resumes] + [resumes[0].get("state")] *
                        (k - len(real)))
    masks, bn_modes, rngs = cohort.stack_inputs(padded)
    seeds = [r.seed for r in padded]
    n = len(real)
    start_epochs = [r.get("start_epoch", 0) for r in resumes]
    histories = [list(r.get("history") or []) for r in resumes]
    best_variables = [r.get("best_variables") for r in resumes]
    best = [train.best_record(h) for h in histories]
    for i in range(n):
        if best[i] is not None and best_variables[i] is None:
            raise ValueError(f"Run {i} resumes after a best epoch but has no best_variables.")
    predictions = [None] * n
    # A run that diverged before an interruption is finished: it stays diverged.
    status = ["diverged" if train.diverged(h) else "ok" for h in histories]
    started = time.perf_counter()
    finished = [None] * n
    for epoch in range(min(start_epochs, default=epochs), epochs):
        active = [i < n and status[i] == "ok" and start_epochs[i] <= epoch for i in range(k)]
        if not any(active):
            break
        state, train_losses, train_accuracies, steps = train_epoch(
            cohort, state, masks, bn_modes, train_split, batch_size, seeds, epoch, rngs, active)
        val = evaluate(cohort, state, validation, batch_size)
        improved = []
        for i in (i for i in range(n) if active[i]):
            record = {"epoch": epoch + 1, "train_loss": train_losses[i],
                      "train_accuracy": train_accuracies[i],
                      "val_accuracy": val[i]["accuracy"], "val_loss": val[i]["loss"],
                      "step": steps[i]}
            histories[i].append(record)
            if not train.finite(record):
                status[i], finished[i] = "diverged", time.perf_counter() - started
            elif train.best_record(histories[i]) is record:
                improved.append(i)
        if improved:
            # The test split is measured once, at the end, from each run's best variables:
            # the same numbers as at its best epoch, without a test pass of all K runs
            # whenever any one of them improves.
            host = cohort.host_variables(state)
            for i in improved:
                predictions[i] = {"validation": val[i]["predicted"], "test": None}
                best[i], best_variables[i] = histories[i][-1], host[i]
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, state, histories, best_variables)
    total = time.perf_counter() - started
    _evaluate_best(cohort, variables, padded, best, best_variables, predictions, validation,
                   test, batch_size)
    results = []
    for i in range(n):
        history = histories[i]
        final = history[-1] if history else {"val_accuracy": 0.0, "step": 0}
        b = best[i] or {"epoch": 0, "val_accuracy": 0.0, "val_loss": float("nan")}
        run = cohort.run_state(state, i)
        results.append(train.FitResult(
            status=status[i], epochs=len(history), best_epoch=b["epoch"],
            val_accuracy=b["val_accuracy"], val_loss=b["val_loss"],
            test_accuracy=b.get("test_accuracy"), final_val_accuracy=final["val_accuracy"],
            train_seconds=finished[i] if finished[i] is not None else total,
            steps=int(final.get("step", 0)), history=history, best_variables=best_variables[i],
            final_variables={"params": run["params"], "batch_stats": run["batch_stats"]},
            predictions=predictions[i]))
    return results


def _evaluate_best(cohort, variables, runs, best, best_variables, predictions, validation,
                   test, batch_size) -> None:
    """From each run's best variables, in one cohort evaluation per split: the test split
    (accuracy into its best epoch's record, and predictions), and the validation predictions
    of runs whose best epoch came before a resume. A run's numbers do not depend on its slot
    or cohort-mates, so they are those its best epoch gave."""
    with_best = [i for i in range(len(predictions)) if best_variables[i] is not None]
    missing = [i for i in with_best if predictions[i] is None]
    if not missing and (test is None or not with_best):
        return
    starts = [best_variables[i] if i in with_best else run.variables
              for i, run in enumerate(runs[:len(predictions)])]
    starts += [runs[0].variables] * (cohort.size - len(starts))
    state = cohort.init(variables, starts)
    if missing:
        validated = evaluate(cohort, state, validation, batch_size)
        for i in missing:
            predictions[i] = {"validation": validated[i]["predicted"], "test": None}
    if test is not None:
        tested = evaluate(cohort, state, test, batch_size)
        for i in with_best:
            best[i]["test_accuracy"] = tested[i]["accuracy"]
            predictions[i]["test"] = tested[i]["predicted"]
