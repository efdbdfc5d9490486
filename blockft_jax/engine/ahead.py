"""A cohort's steps compiled ahead of time, without running them: traced with abstract
arguments (shapes, dtypes, shardings), so that a background thread can compile while other
work runs and the real calls find the programs ready; with the memory XLA plans for each and
the flops it counts.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from blockft_jax.common import streams
from blockft_jax.engine.cohort import EVAL_BATCH_MULTIPLE, MASK_DTYPE, Cohort, live


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


def _abstract_arguments(cohort: Cohort, variables, bn_modes, batch_size: int,
                        image_shape: tuple[int, int, int]) -> _AbstractArguments:
    """The shapes and shardings the compiled steps are traced with (see `compile_steps`)."""
    e, k = cohort.engine, cohort.size
    stacked = lambda x: jax.ShapeDtypeStruct((k, *x.shape), x.dtype, sharding=cohort.per_run)
    images = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.uint8)
    if e.cached:
        images = jax.eval_shape(e.prefix, variables, images)
    like = lambda sharding: lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                            sharding=sharding)
    fed = lambda shape, dtype: jax.ShapeDtypeStruct((k, batch_size, *shape), dtype,
                                                    sharding=cohort.run_batch_sharding)
    return _AbstractArguments(
        stacked=stacked, images=images,
        shared=jax.tree.map(like(cohort.replicated), cohort.shared_part(variables)),
        runs=jax.tree.map(like(cohort.per_run), cohort.abstract_runs(variables)),
        bn_modes=jax.tree.map(stacked, e.live_part(bn_modes)),
        keys=stacked(streams.seed_key(0)),
        index=jax.ShapeDtypeStruct((), jnp.int32, sharding=cohort.replicated),
        fed_batch=(fed(images.shape[1:], images.dtype), fed((), jnp.int32),
                   fed((), jnp.float32)))


def _compiled(cohort: Cohort, kind: str, lowered: Callable):
    """`lowered()`'s program compiled, its seconds (tracing included) counted in the cohort's
    `compile_seconds[kind]`."""
    started = time.perf_counter()
    compiled = lowered().compile()
    cohort.compile_seconds[kind] += time.perf_counter() - started
    return compiled


def _abstract_split(cohort: Cohort, images, n: int, size: int) -> tuple:
    """A DeviceSplit of `n` examples (images like `images`'s rows), and an epoch's order
    and weights in batches of `size`."""
    repl, steps = cohort.replicated, -(-n // size)
    return (jax.ShapeDtypeStruct((n, *images.shape[1:]), images.dtype, sharding=repl),
            jax.ShapeDtypeStruct((n,), jnp.int32, sharding=repl),
            jax.ShapeDtypeStruct((steps, size), jnp.int32, sharding=repl),
            jax.ShapeDtypeStruct((steps, size), jnp.float32, sharding=repl))


def compile_steps(cohort: Cohort, variables, mask, bn_modes, batch_size: int,
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
    e, k = cohort.engine, cohort.size
    a = _abstract_arguments(cohort, variables, bn_modes, batch_size, image_shape)
    live_vars = jax.tree.map(a.stacked, cohort.live_variables(variables))
    masks = jax.tree.map(lambda x: a.stacked(np.asarray(x, MASK_DTYPE)), e.live_part(mask))
    active = jax.ShapeDtypeStruct((k,), jnp.bool_, sharding=cohort.per_run)
    memory = {}
    _compiled(cohort, "state", lambda: cohort.init_runs_step.lower(live_vars))
    _compiled(cohort, "state", lambda: cohort.keep_best_step.lower(live_vars, live_vars, active))
    _compiled(cohort, "state", lambda: cohort.take_run_step.lower(live(a.runs), a.index))
    eval_size = batch_size * eval_batch_multiple
    if device_split_sizes is None:
        compiled = _compiled(cohort, "train", lambda: cohort.train_step.lower(
            a.shared, a.runs, masks, a.bn_modes, *a.fed_batch, a.keys, active))
        memory.update(train=program_bytes(compiled), flops=flops(compiled) / k)
        batch = lambda shape, dtype: jax.ShapeDtypeStruct((eval_size, *shape), dtype,
                                                          sharding=e.batch_sharding)
        evaluation = _compiled(cohort, "eval", lambda: cohort.eval_step.lower(
            a.shared, live(a.runs), batch(a.images.shape[1:], a.images.dtype),
            batch((), jnp.int32), batch((), jnp.float32)))
        memory["eval"] = program_bytes(evaluation)
        cohort.executables = {"train": compiled, "eval": evaluation}
        return memory

    sizes = dict(device_split_sizes)
    split_images, split_labels, order, weights = _abstract_split(cohort, 
        a.images, sizes.pop("train"), batch_size)
    compiled = _compiled(cohort, "train", lambda: cohort.train_epoch_gathered.lower(
        a.shared, a.runs, masks, a.bn_modes, split_images, split_labels, a.stacked(order),
        a.stacked(weights), a.keys, active))
    # XLA's cost analysis counts a loop's body once: the epoch's flops are its step's.
    memory.update(train=program_bytes(compiled), flops=flops(compiled) / k)
    evaluations = [_compiled(cohort, "eval", lambda n=n: cohort.evaluate_gathered.lower(
        a.shared, live(a.runs), *_abstract_split(cohort, a.images, n, eval_size)))
        for n in sorted(set(sizes.values()))]
    memory["eval"] = max(map(program_bytes, evaluations))
    cohort.executables = {"train": compiled, "eval": evaluations[-1]}  # the largest split's
    return memory


def compile_norms(cohort: Cohort, variables, bn_modes, batch_size: int,
                  image_shape: tuple[int, int, int],
                  device_split_sizes: dict[str, int] | None = None) -> None:
    """Traces and compiles Auto-RGN's measurement step (`gradient_norms`) ahead, as
    `compile_steps` does the others (the same shapes, `bn_modes` any candidate's)."""
    a = _abstract_arguments(cohort, variables, bn_modes, batch_size, image_shape)
    if device_split_sizes is None:
        _compiled(cohort, "norms", lambda: cohort.gradient_norms_step.lower(
            a.shared, a.runs, a.bn_modes, *a.fed_batch, a.keys, a.index))
        return
    images, labels, order, weights = _abstract_split(cohort, 
        a.images, device_split_sizes["train"], batch_size)
    _compiled(cohort, "norms", lambda: cohort.gradient_norms_step_gathered.lower(
        a.shared, a.runs, a.bn_modes, images, labels, a.stacked(order), a.stacked(weights),
        a.keys, a.index))


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
