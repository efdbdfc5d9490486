"""What a search costs, before it runs: work per unit, the machine's speed, the split of the
candidates into engines, and the estimated time.

- Work: the forward flops of each unit per image, from the layer table and the variables'
  shapes (multiply-adds of convolutions and dense layers, x2; one flop per output element of
  the other layers). An engine from unit b trains a step in about 3x the flops of the units
  from b up (forward, and backward through the live layers), and validates in 1x.
- Speed: the shallowest engine's train step and the forward pass below it, compiled and timed
  on this machine (`measure`, random data of the real shapes): a cost per flop (from the
  forward pass: backward passes are assumed as fast per flop), a cost per step beyond its flops
  (dispatch and small ops dominate shallow steps on a CPU), and an engine's compile time;
  measured once per machine and job and kept (`measure_once`), so that load does not move it.
  The same step for a cohort of COHORT_PROBE runs gives what a cohort's runs share of a step
  (`cohort_speedup`: on a CPU a cohort pays where steps are short, not where they are long).
- Engines (`split`): candidates go to at most `search.engines` engines by their lowest trained
  unit; an engine from unit b serves candidates whose layers all lie at or above b. The split
  minimises compile time plus training time (dynamic programming over the units).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Sequence

import jax
import jaxlib
import numpy as np

from blockft_jax.candidates import groups, strategies
from blockft_jax.common.durable import write_atomic
from blockft_jax.engine import cohort as cohort_lib
from blockft_jax.engine import train
from blockft_jax.inputs.weights import cache_dir

log = logging.getLogger(__name__)


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


# The runs of the cohort `measure` times beside one run, for what a cohort's runs share.
COHORT_PROBE = 4
TIMING_ROUNDS = 3  # each step timed this often, taking turns; the fastest round counts


@dataclasses.dataclass(frozen=True)
class Speed:
    """A run-step from unit u takes `step_seconds + flops(u) * seconds_per_flop`; in a cohort
    of k runs, `shared_step_seconds` of it is paid once for all k."""
    seconds_per_flop: float
    compile_seconds: float       # one engine's train and eval steps
    measured_on: str             # what was timed
    step_seconds: float = 0.0    # what a step costs whatever its work (dispatch, small ops)
    shared_step_seconds: float = 0.0   # of a step, what a cohort's runs pay once

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def seconds(self, flops: float, steps: int) -> float:
        return steps * self.step_seconds + flops * self.seconds_per_flop

    def cohort_speedup(self, flops: float, runs: int) -> float:
        """Run-steps a second in a cohort of `runs` over one run alone, for a step of `flops`
        per run: the shared part of a step paid once, the rest (its flops) by every run. On
        the demo's 2-core Xeon: 3.0x for the head's step (measured 3.0x at 6 runs), 1.1-1.4x
        for the top blocks' (measured 1.2-1.4x), 1.1x for the whole network (0.96x)."""
        alone = self.seconds(flops, 1)
        shared = min(self.shared_step_seconds, alone)
        return alone / max(alone - shared * (1 - 1 / max(runs, 1)), 1e-12)


def measure_once(config, plan, module, table, variables, tx, *, batch_size: int,
                 image_shape) -> Speed:
    """`measure`, once per machine and job: kept under the cache directory, keyed by what the
    timed steps depend on (the machine, JAX's version, the model, the optimizer, the batch,
    the unit timed), so that a rerun, or the same command beside another load, splits the
    engines alike -- the split sets float order, and with it the numbers. Delete the file
    (named in the log) to measure again."""
    path = _speed_path(config, plan, batch_size, image_shape)
    try:
        speed = Speed(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        speed = None
    if speed is not None:
        log.info("This machine's speed for this job, as measured before: %s", path)
        return speed
    log.info("Timing this machine for the engines' split (three small compilations; kept in "
             "%s)...", path)
    speed = measure(plan, module, table, variables, tx, batch_size=batch_size,
                    image_shape=image_shape)
    write_atomic(path, json.dumps(speed.to_json(), indent=1) + "\n")
    return speed


def _speed_path(config, plan, batch_size: int, image_shape) -> Path:
    device = jax.local_devices()[0]
    model = {k: v for k, v in config.model.to_dict().items() if k != "weights"}
    key = {"device": [device.platform, device.device_kind, len(jax.local_devices())],
           "cpu": [_cpu_model(), os.cpu_count()], "jax": [jax.__version__, jaxlib.__version__],
           "model": model, "optimizer": config.train.optimizer,
           "dtype": config.train.compute_dtype, "batch": batch_size,
           "shape": list(image_shape), "unit": _timed_unit(plan), "probe": COHORT_PROBE}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir() / "speed" / f"{config.model.name}-{digest[:16]}.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def _timed_unit(plan) -> str:
    """The unit whose engine `measure` times: the shallowest candidates' lowest unit (the
    head's with none but the whole network's)."""
    return max((plan.lowest_unit(g) for g in plan.shared), key=plan.units.index,
               default=plan.units[-1])


def measure(plan, module, table, variables, tx, *, batch_size: int, image_shape,
            steps: int = 5) -> Speed:
    """This machine's speed, cheaply (a dry run pays it): the real train step of one run of the
    engine of `plan`'s shallowest candidates (the prefix's output as input, as the search
    caches it) and the frozen prefix's forward pass below it, each compiled and timed on random
    inputs of the real shapes (nothing is loaded), on this process's first device alone (the
    others, and other processes, do not join its steps). The forward pass gives the seconds
    per flop (the bulk of a deep step's work: its convolutions), the train step what a step
    costs beyond its flops, and the two compilations one engine's compile time; the same
    step for a cohort of COHORT_PROBE runs (a third compilation, not counted as the engine's)
    what a cohort's runs share of a step."""
    unit = _timed_unit(plan)
    mesh = train.data_mesh(jax.local_devices()[:1])
    names = module.unit_names()
    per_image = suffix_flops(table, variables, names)
    cached = unit != names[0]
    engine = train.Engine(module, tx, unit, mesh, cached=cached, table=table,
                          prefix_chunk_bytes=train.default_prefix_chunk_bytes())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8)
    compile_seconds, steps_of = 0.0, {}

    def compile_(name, step, *inputs, engine_compile=True):
        nonlocal compile_seconds
        started = time.perf_counter()
        out = jax.block_until_ready(step(*inputs))  # compiles, and warms up
        if engine_compile:  # the probe's cohort is not one of the engine's own compilations
            compile_seconds += time.perf_counter() - started
        steps_of[name] = (step, inputs)
        return out

    features = compile_("forward", engine._features, variables, images) if cached else None
    inputs = np.asarray(features) if cached else images
    for k in (1, COHORT_PROBE):
        compile_(k, _train_step_of(engine, variables, table, inputs, k), engine_compile=k == 1)
    timed = _fastest_step_seconds(steps_of, steps)
    # One run's step = shared + own; the probe's = shared + COHORT_PROBE x own.
    own = max(0.0, (timed[COHORT_PROBE] - timed[1]) / (COHORT_PROBE - 1))
    shared = max(0.0, timed[1] - own)
    train_flops = 3 * per_image[unit] * batch_size
    if cached:
        per_flop = timed["forward"] / max((per_image[names[0]] - per_image[unit]) * batch_size, 1.0)
        per_step = max(0.0, timed[1] - train_flops * per_flop)
    else:  # nothing below: the train step alone
        per_flop, per_step = timed[1] / max(train_flops, 1.0), 0.0
    return Speed(per_flop, compile_seconds,
                 f"the forward pass below unit {unit} and the train step from it of one run "
                 f"and of {COHORT_PROBE}, batch {batch_size}", per_step, shared)


def _fastest_step_seconds(steps_of: dict, steps: int, rounds: int = TIMING_ROUNDS) -> dict:
    """Seconds a call of each compiled step takes: `steps` calls timed together, in `rounds`
    rounds that take the steps in turn, the fastest round kept. A load beside us (another
    process, a test worker) only ever slows a round, and taking turns lets it slow no step
    alone: the shared part of a cohort's step is a difference of two timings, which one slow
    round of either used to push to nothing (measured: 0.0 under a parallel suite)."""
    fastest = dict.fromkeys(steps_of, float("inf"))
    for _ in range(rounds):
        for name, (step, inputs) in steps_of.items():
            started = time.perf_counter()
            for _ in range(steps):
                out = step(*inputs)
            jax.block_until_ready(out)
            fastest[name] = min(fastest[name], (time.perf_counter() - started) / steps)
    return fastest


def _train_step_of(engine, variables, table, inputs, k: int):
    """A cohort of `k` runs of `engine` stepping on `inputs` (one batch, each run the same),
    as a call without arguments; its state is donated, so each call takes the last one's."""
    cohort = cohort_lib.Cohort(engine, k)
    runs_ = [cohort_lib.Run(groups.param_mask(variables["params"], table, []),
                            groups.bn_modes(table, []), seed=i) for i in range(k)]
    state = cohort.init(variables, runs_)
    masks, bn_modes, keys = cohort.stack_inputs(runs_)
    batch = len(inputs)
    # Placed whole (the mesh is this process's own devices), not fed as a process's share.
    fed = [jax.device_put(x, cohort.run_batch_sharding) for x in (
        np.broadcast_to(inputs, (k, *inputs.shape)), np.zeros((k, batch), np.int32),
        np.ones((k, batch), np.float32))]
    active = cohort.place_runs(np.ones(k, bool))
    runs = state.runs

    def step():
        nonlocal runs
        runs, _ = cohort.train_step(state.shared, runs, masks, bn_modes, *fed, keys, active)
        return runs
    return step


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
    every image, Auto-RGN's measurement batches, and one compilation per engine: {'seconds',
    'compile', 'train', 'prefix'}."""
    train_images, validation_images = images
    train_steps = -(-train_images // batch_size)
    steps = train_steps + -(-validation_images // eval_batch_size)
    train = 0.0
    for strategy in plan.strategies:
        count = plan.candidate_count(strategy)
        per_candidate = plan.expected(strategy)[1] / max(count, 1)
        for group in plan.planned.get(strategy, [None] * count):
            unit = plan.engines[-1] if group is None else plan.engine_of(group)
            epoch = speed.seconds(epoch_flops(suffix[unit], train_images, validation_images),
                                  steps)
            if strategies.REGISTRY[strategy].measures:  # a gradient on a few batches an epoch
                measured = min(int(group.option), train_steps)
                epoch += speed.seconds(3 * suffix[unit] * batch_size * measured, measured)
            train += per_candidate * epoch
    first = suffix[plan.units[0]]
    prefix = sum(first - suffix[u] for u in plan.from_units) * (
        train_images + 2 * validation_images)
    parts = {"train": train, "prefix": speed.seconds(prefix, 0),
             "compile": len(plan.from_units) * speed.compile_seconds}
    return {"seconds": sum(parts.values()), **parts}
