"""A cohort's steps as pure functions: the engine's per-run steps (`train.Engine`) vmapped over
a leading run axis, the mesh's 'runs' (`spmd_axis_name`). Per run, the engine's state is
reassembled from the shared frozen variables and the run's live part (`whole`), stepped, and
split again; runs that are not `active` keep their state unchanged (`where`, so bitwise).
`cohort.Cohort` jits them with its shardings; each counts its traces (`compilations`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax
import jax.numpy as jnp

from blockft_jax.engine import train

log = logging.getLogger(__name__)


def whole(shared, run) -> dict:
    """{'params', 'batch_stats'} of one run: the shared frozen layers and its live ones."""
    return {"params": {**shared["params"], **run["params"]},
            "batch_stats": {**shared["batch_stats"], **run["batch_stats"]}}


@dataclasses.dataclass
class VmappedSteps:
    """The steps of `engine` for cohorts of `size` runs, before jit."""

    engine: train.Engine
    size: int
    compilations: dict = dataclasses.field(
        default_factory=lambda: {"train": 0, "eval": 0, "norms": 0})

    def _counted(self, kind: str, trace: Callable):
        """Traces `trace()` as one compilation of the cohort's `kind` step."""
        self.compilations[kind] += 1
        log.debug("Tracing the %s step from unit %s for %d run(s) (compilation #%d)", kind,
                  self.engine.from_unit, self.size, self.compilations[kind])
        return trace()

    def _stepped(self, shared, run, active, step_fn):
        state = {**whole(shared, run), "opt_state": run["opt_state"], "step": run["step"]}
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

    def train_step(self, shared, runs, masks, bn_modes, images, labels, weights, keys, active):
        def one(shared, run, mask, bn, images, labels, weights, key, active):
            return self._stepped(shared, run, active, lambda state: self.engine.train_step(
                state, mask, bn, images, labels, weights, key))

        # spmd_axis_name: the run axis is the mesh's 'runs' (sharding constraints keep it so).
        return self._counted("train", lambda: jax.vmap(one, in_axes=(
            None, 0, 0, 0, 0, 0, 0, 0, 0), spmd_axis_name="runs")(
                shared, runs, masks, bn_modes, images, labels, weights, keys, active))

    def train_step_gathered(self, shared, runs, masks, bn_modes, split_images, split_labels,
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

    def train_epoch_gathered(self, shared, runs, masks, bn_modes, split_images, split_labels,
                             orders, weights, keys, active):
        # The epoch is one program: the step scanned over the epoch's batches (each run's step
        # counter picks its batch), so the host dispatches once an epoch, not once a step.
        # Metrics come out runs first: (runs, steps).
        def step(runs, _):
            return self.train_step_gathered(shared, runs, masks, bn_modes, split_images,
                                            split_labels, orders, weights, keys, active)

        runs, metrics = jax.lax.scan(step, runs, length=orders.shape[1])
        return runs, jax.tree.map(lambda m: jnp.moveaxis(m, 0, 1), metrics)

    def eval_step(self, shared, live, images, labels, weights):
        # Evaluation has no order to shuffle: every run sees the same batch.
        def one(shared, live, images, labels, weights):
            return self.engine.eval_step(whole(shared, live), images, labels, weights)

        return self._counted("eval", lambda: jax.vmap(one, in_axes=(
            None, 0, None, None, None), spmd_axis_name="runs")(
                shared, live, images, labels, weights))

    def eval_step_gathered(self, shared, live, split_images, split_labels, order, weights,
                           index):
        def one(shared, live, split_images, split_labels, order, weights, index):
            return self.engine.eval_step_gathered(whole(shared, live), split_images,
                                                  split_labels, order, weights, index)

        return self._counted("eval", lambda: jax.vmap(one, in_axes=(
            None, 0, None, None, None, None, None), spmd_axis_name="runs")(
                shared, live, split_images, split_labels, order, weights, index))

    def evaluate_gathered(self, shared, live, split_images, split_labels, order, weights):
        # The whole split in one program: the eval step scanned over its batches; outputs runs
        # first: (runs, batches, ...).
        def batch(carry, index):
            return carry, self.eval_step_gathered(shared, live, split_images, split_labels,
                                                  order, weights, index)

        _, outs = jax.lax.scan(batch, None, jnp.arange(order.shape[0], dtype=jnp.int32))
        return jax.tree.map(lambda m: jnp.moveaxis(m, 0, 1), outs)

    def norms_step(self, shared, runs, bn_modes, images, labels, weights, keys, index):
        def one(shared, run, bn, images, labels, weights, key):
            state = {**whole(shared, run), "step": run["step"]}
            return self.engine.gradient_norms(state, bn, images, labels, weights, key, index)

        return self._counted("norms", lambda: jax.vmap(one, in_axes=(
            None, 0, 0, 0, 0, 0, 0), spmd_axis_name="runs")(
                shared, runs, bn_modes, images, labels, weights, keys))

    def norms_step_gathered(self, shared, runs, bn_modes, split_images, split_labels, orders,
                            weights, keys, index):
        def one(shared, run, bn, split_images, split_labels, order, weights, key):
            state = {**whole(shared, run), "step": run["step"]}
            return self.engine.gradient_norms_gathered(state, bn, split_images, split_labels,
                                                       order, weights, key, index)

        return self._counted("norms", lambda: jax.vmap(one, in_axes=(
            None, 0, 0, None, None, 0, 0, 0), spmd_axis_name="runs")(
                shared, runs, bn_modes, split_images, split_labels, orders, weights, keys))

    def init_runs(self, live_variables):
        # Every run's fresh state from its own (stacked) live variables.
        return jax.vmap(self.engine.init_state)(live_variables)

    @staticmethod
    def keep_best(best, live, improved):
        pick = lambda new, old: jnp.where(improved.reshape((-1,) + (1,) * (old.ndim - 1)),
                                          new, old)
        return jax.tree.map(pick, live, best)
