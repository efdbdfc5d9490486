"""What a search costs, before it runs: work per unit, the machine's speed, the split of the
candidates into engines, and the estimated time.

- Work: the forward flops of each unit per image, from the layer table and the variables'
  shapes (multiply-adds of convolutions and dense layers, x2; one flop per output element of
  the other layers). An engine from unit b trains a step in about 3x the flops of the units
  from b up (forward, and backward through the live layers), and validates in 1x.
- Speed: real train steps compiled and timed on this machine (`measure`): the engines from the
  shallowest and the deepest candidate's unit, one run, random data of the real shapes. Two
  points give a cost per step (dispatch and small ops dominate shallow steps on a CPU) and a
  cost per flop, and the seconds one engine's steps take to compile.
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
    """A run-step from unit u takes `step_seconds + flops(u) * seconds_per_flop`."""
    seconds_per_flop: float
    compile_seconds: float       # one engine's train and eval steps
    measured_on: str             # what was timed
    step_seconds: float = 0.0    # what a step costs whatever its work (dispatch, small ops)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def seconds(self, flops: float, steps: int) -> float:
        return steps * self.step_seconds + flops * self.seconds_per_flop


def measure(module, table, variables, tx, units: Sequence[str], mesh, *, batch_size: int,
            image_shape, steps: int = 5) -> Speed:
    """Compiles and times the real train step of one run of the engine from each of `units`
    (one or two: the shallowest and the deepest; random inputs of the real shapes, the prefix's
    output where the search would cache it; nothing is loaded): this machine's speed, as a
    cost per step and a cost per flop fitted through the points."""
    per_image = suffix_flops(table, variables, module.unit_names())
    points, compile_seconds = [], []
    for unit in dict.fromkeys(units):
        seconds, compiled = _time_step(module, table, variables, tx, unit, mesh, batch_size,
                                       image_shape, steps)
        points.append((3 * per_image[unit] * batch_size, seconds))
        compile_seconds.append(compiled)
    (f0, t0), (f1, t1) = points[0], points[-1]
    per_flop = (t1 - t0) / (f1 - f0) if f1 > f0 and t1 > t0 else t1 / max(f1, 1.0)
    per_step = max(0.0, t0 - per_flop * f0) if len(points) > 1 else 0.0
    return Speed(per_flop, float(np.mean(compile_seconds)),
                 f"one run's train step from unit(s) {', '.join(dict.fromkeys(units))}, "
                 f"batch {batch_size}", per_step)


def _time_step(module, table, variables, tx, unit, mesh, batch_size, image_shape, steps):
    """(seconds per step, seconds to compile) of one run's train step from `unit`."""
    import jax

    from blockft_jax import cohort as cohort_lib
    from blockft_jax import groups, train

    cached = unit != module.unit_names()[0]
    engine = train.Engine(module, tx, unit, mesh, cached=cached, table=table,
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
    if cached:
        shape = jax.eval_shape(engine.prefix, variables, jax.ShapeDtypeStruct(
            (batch_size, *image_shape), np.uint8)).shape
        inputs = rng.standard_normal((1, *shape)).astype(np.float32)
    else:
        inputs = rng.integers(0, 256, (1, batch_size, *image_shape), dtype=np.uint8)
    labels = np.zeros((1, batch_size), np.int32)
    fed = [cohort.feed(x) for x in (inputs, labels, np.ones((1, batch_size), np.float32))]
    active = cohort.place_runs(np.ones(1, bool))
    runs = state.runs
    for i in range(steps + 1):
        if i == 1:  # the first step warms up
            jax.block_until_ready(runs)
            started = time.perf_counter()
        runs, _ = cohort.train_step(state.shared, runs, masks, bn_modes, *fed, keys, active)
    jax.block_until_ready(runs)
    return (time.perf_counter() - started) / steps, compile_seconds


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


def estimate(plan, suffix: dict[str, float], speed: Speed, images: tuple[int, int],
             batch_size: int, eval_batch_size: int) -> dict:
    """The search's estimated seconds, from the schedule's expected run-epochs per candidate,
    each engine's steps and flops per run-epoch, the prefix caches' one forward pass over
    every image, and one compilation per engine: {'seconds', 'compile', 'train', 'prefix'}."""
    from blockft_jax import schedule
    train_images, validation_images = images
    steps = -(-train_images // batch_size) + -(-validation_images // eval_batch_size)
    train = 0.0
    for strategy in plan.strategies:
        count = plan.candidate_count(strategy)
        per_candidate = schedule.expected(count, plan.rungs, plan.eta)[1] / max(count, 1)
        units = ([plan.engines[-1]] * count if strategy == "topk" else
                 [plan.engine_of(g) for g in plan.planned[strategy]])
        train += sum(per_candidate * speed.seconds(
            epoch_flops(suffix[u], train_images, validation_images), steps) for u in units)
    first = suffix[plan.units[0]]
    prefix = sum(first - suffix[u] for u in plan.from_units) * (
        train_images + 2 * validation_images)
    parts = {"train": train, "prefix": speed.seconds(prefix, 0),
             "compile": len(plan.from_units) * speed.compile_seconds}
    return {"seconds": sum(parts.values()), **parts}


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else
            f"{seconds // 60}m{seconds % 60:02d}s")
