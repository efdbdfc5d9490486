"""What a search costs, before it runs: work per unit, the machine's speed, the split of the
candidates into engines, and the estimated time.

- Work: the forward flops of each unit per image, from the layer table and the variables'
  shapes (multiply-adds of convolutions and dense layers, x2; one flop per output element of
  the other layers). An engine from unit b trains a step in about 3x the flops of the units
  from b up (forward, and backward through the live layers), and validates in 1x.
- Speed: one real train step compiled and timed on this machine (`measure`): the engine from
  the shallowest candidate's unit, one run, random data of the real shapes. It gives seconds
  per flop (its small matrices make it an upper bound for deeper engines) and the seconds one
  engine's steps take to compile.
- Engines (`split`): candidates go to at most `search.engines` engines by their lowest trained
  unit; an engine from unit b serves candidates whose layers all lie at or above b. The split
  minimises compile time plus training time (dynamic programming over the units).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import numpy as np


def unit_flops(table, variables) -> dict[str, float]:
    """Forward flops per image of each unit, from the layer table and the variables' shapes."""
    params = variables["params"]
    flops: dict[str, float] = {}
    for r in table:
        size = math.prod(r.output_shape[1:])
        kernel = params.get(r.name, {}).get("kernel") if r.has_weights else None
        if kernel is not None:  # conv, depthwise (kh, kw, 1, C), dense: a multiply-add each
            work = 2 * math.prod(r.output_shape[1:-1]) * math.prod(kernel.shape)
        else:
            work = size
        flops[r.unit] = flops.get(r.unit, 0.0) + work
    return flops


def suffix_flops(table, variables, units: Sequence[str]) -> dict[str, float]:
    """Forward flops per image from each unit to the output."""
    per_unit = unit_flops(table, variables)
    suffix, total = {}, 0.0
    for unit in reversed(units):
        total += per_unit.get(unit, 0.0)
        suffix[unit] = total
    return suffix


def epoch_flops(suffix: float, train_images: int, validation_images: int) -> float:
    """One run's epoch from a unit whose suffix costs `suffix` flops per image: training (3x
    forward) and validation (1x)."""
    return suffix * (3 * train_images + validation_images)


@dataclasses.dataclass(frozen=True)
class Speed:
    seconds_per_flop: float
    compile_seconds: float       # one engine's train and eval steps
    measured_on: str             # what was timed

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def measure(module, table, variables, tx, unit: str, mesh, *, batch_size: int,
            image_shape, steps: int = 5) -> Speed:
    """Compiles and times the real train step of one run of the engine from `unit` (random
    inputs of the real shapes; nothing is loaded): this machine's speed."""
    import jax

    from blockft_jax import cohort as cohort_lib
    from blockft_jax import groups, train

    engine = train.Engine(module, tx, unit, mesh, table=table,
                          prefix_chunk_bytes=train.default_prefix_chunk_bytes())
    cohort = cohort_lib.Cohort(engine, 1)
    run = cohort_lib.Run(groups.param_mask(variables["params"], table, []),
                         groups.bn_modes(table, []), seed=0)
    started = time.perf_counter()
    cohort.compile_steps(variables, run.mask, run.bn_modes, batch_size, image_shape)
    compile_seconds = time.perf_counter() - started
    state = cohort.init(variables, [run])
    masks, bn_modes, keys = cohort.stack_inputs([run])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, batch_size, *image_shape), dtype=np.uint8)
    labels = np.zeros((1, batch_size), np.int32)
    fed = [cohort.feed(x) for x in (images, labels, np.ones((1, batch_size), np.float32))]
    active = cohort.place_runs(np.ones(1, bool))
    runs = state.runs
    for i in range(steps + 1):
        if i == 1:  # the first step warms up
            jax.block_until_ready(runs)
            started = time.perf_counter()
        runs, _ = cohort.train_step(state.shared, runs, masks, bn_modes, *fed, keys, active)
    jax.block_until_ready(runs)
    step_seconds = (time.perf_counter() - started) / steps
    units = module.unit_names()
    flops = 3 * suffix_flops(table, variables, units)[unit] * batch_size
    return Speed(step_seconds / max(flops, 1.0), compile_seconds,
                 f"one run's train step from unit {unit}, batch {batch_size}")


def split(work: dict[str, float], suffix: dict[str, float], units: Sequence[str],
          engines: int, speed: Speed) -> list[str]:
    """The engines' units (shallowest first): at most `engines` of them, covering every
    candidate, that minimise compile plus training seconds. `work`: per lowest trained unit,
    the images its candidates' runs will pass through an engine (`epoch_flops` / suffix, summed
    over their run-epochs); they cost `suffix[b]` flops each in the engine from unit b."""
    order = sorted(work, key=units.index)  # the distinct lowest units, deepest first
    n = len(order)
    compile_flops = speed.compile_seconds / speed.seconds_per_flop

    def cost(i: int, j: int) -> float:  # one engine from order[i] serving order[i:j]
        return compile_flops + sum(work[u] for u in order[i:j]) * suffix[order[i]]

    # best[k][i]: the cheapest cover of order[i:] by at most k engines, the first at order[i].
    best = [[math.inf] * (n + 1) for _ in range(engines + 1)]
    choice: dict[tuple[int, int], int] = {}
    for k in range(engines + 1):
        best[k][n] = 0.0
    for k in range(1, engines + 1):
        for i in range(n - 1, -1, -1):
            for j in range(i + 1, n + 1):
                rest = 0.0 if j == n else best[k - 1][j]
                total = cost(i, j) + rest
                if total < best[k][i]:
                    best[k][i], choice[k, i] = total, j
    chosen, k, i = [], engines, 0
    while i < n:
        chosen.append(order[i])
        i, k = choice[k, i], k - 1
    return sorted(chosen, key=units.index, reverse=True)


def estimate(plan, suffix: dict[str, float], speed: Speed, images: tuple[int, int]) -> dict:
    """The search's estimated seconds, from the schedule's expected run-epochs per candidate,
    each engine's work per run-epoch (`epoch_flops`), the prefix caches' one forward pass
    over every image, and one compilation per engine: {'seconds', 'compile', 'train',
    'prefix'}."""
    from blockft_jax import schedule
    train_images, validation_images = images
    work = 0.0
    for strategy in plan.strategies:
        count = plan.candidate_count(strategy)
        per_candidate = schedule.expected(count, plan.rungs, plan.eta)[1] / max(count, 1)
        units = ([plan.engines[-1]] * count if strategy == "topk" else
                 [plan.engine_of(g) for g in plan.planned[strategy]])
        work += sum(per_candidate * epoch_flops(suffix[u], train_images, validation_images)
                    for u in units)
    first = suffix[plan.units[0]]
    prefix = sum(first - suffix[u] for u in plan.from_units) * (
        train_images + 2 * validation_images)
    parts = {"train": work * speed.seconds_per_flop,
             "prefix": prefix * speed.seconds_per_flop,
             "compile": len(plan.from_units) * speed.compile_seconds}
    return {"seconds": sum(parts.values()), **parts}


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else
            f"{seconds // 60}m{seconds % 60:02d}s")
