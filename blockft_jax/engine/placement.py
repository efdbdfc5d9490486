"""Where an engine's runs go and how many train at once: decided once per engine, by process 0,
from the compiler, and followed by every process.

- The layout (`layout`): the devices on a ('runs', 'data') grid. A search's runs are
  independent (they exchange nothing), while a run whose batch is split over 'data' all-reduces
  its gradients and BatchNorm statistics every step and trains on slivers of its batch; so each
  device trains runs of its own first, and a run gets several devices only when there are
  fewer runs than devices (and its batch splits evenly into pieces of MIN_ROWS_PER_DEVICE or
  more), or when one run does not fit a device's memory.
- The prefix cache lives in device memory when it fits: on CPU always (device memory is the
  host memory it would take anyway), on an accelerator within a quarter of the free memory.
- The cohort size K: the real train and eval steps are compiled for the largest cohort worth
  having (`largest_cohort`: the runs to train, `search.parallel`, and on CPU the runs whose
  live state fits in the last-level cache, and one run where a cohort would not gain
  MIN_CPU_COHORT_SPEEDUP by the machine's measured speed), and XLA's own memory plan of those programs
  (`compiled.memory_analysis()`: arguments, outputs and temporaries) plus what stays resident
  beside them (the prefix cache, each run's best variables) is compared with the memory
  available: the device's free memory (`memory_stats()`), or on CPU a quarter of the host's
  memory (all of it: what is free now moves with the load, and would move the numbers). Too
  large: K shrinks by the measured bytes per run and the steps are compiled again. The
  evaluation batch (a multiple of the training batch) shrinks the same way.

The decision is logged with its figures and kept in cohorts.json with the machine it was made
for; a rerun on the same kind of machine keeps it (so it forms the same cohorts), on another
it decides again.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable

import jax

from blockft_jax.common import multihost
from blockft_jax.common.durable import write_atomic
from blockft_jax.engine import cohort as cohort_lib
from blockft_jax.engine import train

log = logging.getLogger(__name__)

COHORTS = "cohorts.json"   # the decisions, per engine (lowest trainable unit), in the workdir
MAX_COHORT = 64
CPU_MEMORY_SHARE = 0.25      # of the host's memory, the budget of an engine on CPU
CACHE_SHARE = 0.25           # of an accelerator's free memory the prefix cache may take
EVAL_BATCH_MULTIPLES = (4, 2, 1)
# A smaller cohort than placed is compiled when the padded run-epochs it saves amount to this
# many epochs of a full placed cohort (`padding_worth_cutting`): on the demo a size compiled in
# 5-11 s for an engine on the prefix cache (0.2-0.6 s an epoch), 48 s for the whole network's
# (2.3 s an epoch), so 20 such epochs.
PADDING_COHORT_EPOCHS = 20
# On CPU a cohort is formed only where it trains at least this much faster per run than one
# run alone (the caller's `speedup`, measured on this machine): its programs compile longer
# than one run's and beside training on the same cores (the demo, 2-core Xeon, empty cache:
# 138.5 s of compilation against 73.1 s one run at a time), and a vmapped step over a long
# step shares little (the whole network: 0.96x at 8 runs). The demo's cohorts as they were,
# gaining 1.2-1.4x on the top blocks' steps, made the search 0.72x one run at a time.
MIN_CPU_COHORT_SPEEDUP = 1.5
# A run's batch is not cut finer than this per device: below it a step's fixed costs (the
# all-reduce, the weights' reads, a TPU's 8x128 tiles) outweigh the rows it computes.
MIN_ROWS_PER_DEVICE = 8


@dataclasses.dataclass(frozen=True)
class Placement:
    cohort_size: int
    cache_on_device: bool
    eval_batch_multiple: int
    machine: dict            # what it was decided for: device kind, count, memory
    figures: dict            # the numbers behind it (bytes), for the log and cohorts.json
    layout: tuple = (1, 1)   # (runs, data): the mesh's axes (`layout`)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Prepared:
    """An engine, its inputs (the prefix cache when it has one), its cohorts compiled so far,
    and where its runs go: the placement decided from its compiled steps (None until decided)."""
    engine: train.Engine
    splits: dict
    runs: int
    cohorts: dict                    # cohort size -> Cohort (the compiled ones)
    compiled: dict                   # (size, eval multiple) -> program bytes and flops
    compiling: concurrent.futures.Future | None
    cache_on_device: bool
    caps: dict
    placement: Placement | None = None
    announced: bool = False          # its placement logged
    # Auto-RGN's measurement compiling in the background for the placed cohort (engines that
    # train it): its runs wait for it, the others train meanwhile.
    norms: concurrent.futures.Future | None = None

    @property
    def cohort(self) -> cohort_lib.Cohort:
        return self.cohorts[self.placement.cohort_size]

    def compilations(self) -> dict:
        """Steps this process traced and compiled for this engine (`norms`: Auto-RGN's
        measurement, compiled only by an engine that trains it), the cohort sizes whose
        train step compiled (one each, unless a size compiled twice), and the seconds each kind
        of program took to trace and compile, all sizes together (`seconds`; 'state': a
        cohort's init, keep-best and take-run programs)."""
        counts = {kind: sum(c.compilations[kind] for c in self.cohorts.values())
                  for kind in ("train", "eval", "norms")}
        seconds = {kind: round(sum(c.compile_seconds[kind] for c in self.cohorts.values()), 2)
                   for kind in cohort_lib.PROGRAM_KINDS}
        return {**counts, "features": self.engine.compilations["features"],
                "cohorts": sorted(k for k, c in self.cohorts.items() if c.compilations["train"]),
                "seconds": seconds}

    def flops_per_run(self) -> float | None:
        """The compiled train step's flops per run, once it has compiled."""
        if self.compiling is not None and self.compiling.done():
            return self.compiling.result().get("flops")
        return next((m.get("flops") for m in self.compiled.values()), None)


def layouts(devices: int, runs: int, batch_size: int) -> list[tuple[int, int]]:
    """The (runs, data) grids of `devices` worth having for `runs` runs to train with global
    batches of `batch_size`, best first: the fewest devices per run that leave no device
    without a run of its own, then more devices per run (for a run that does not fit one).
    A run's batch splits evenly, into pieces of MIN_ROWS_PER_DEVICE rows or more (or not at
    all)."""
    if devices < 1 or batch_size < 1:
        raise ValueError(f"devices={devices}, batch_size={batch_size}: both must be >= 1.")
    options = [(devices // d, d) for d in range(1, devices + 1) if devices % d == 0 and (
        d == 1 or (batch_size % d == 0 and batch_size // d >= MIN_ROWS_PER_DEVICE))]
    enough = [o for o in options if o[0] <= max(runs, 1)]
    # Fewer runs than 'runs' positions whatever the split: the fewest positions (some idle).
    return enough or [min(options)]


def layout(devices: int, runs: int, batch_size: int,
           fits: Callable[[tuple[int, int]], bool] | None = None) -> tuple[int, int]:
    """Process 0's layout (runs, data) of `devices` (see `layouts`): the first whose one run
    per 'runs' position `fits` a device's memory (`fits(layout)`, e.g. from its compiled step;
    None: the first), else the one that splits a run over the most devices."""
    options = layouts(devices, runs, batch_size)
    if fits is None:
        return options[0]
    return next((o for o in options if fits(o)), min(options))


def local_devices(mesh) -> list:
    return [d for d in mesh.devices.reshape(-1) if d.process_index == jax.process_index()]


def on_cpu(mesh) -> bool:
    return all(d.platform == "cpu" for d in local_devices(mesh))


def machine(mesh) -> dict:
    """The kind of machine a placement is decided for: its device kind and count, and the
    memory of its smallest device (the host's on CPU)."""
    devices = local_devices(mesh)
    if on_cpu(mesh):
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        memory = min((d.memory_stats() or {}).get("bytes_limit", 0) for d in devices)
    return {"device": devices[0].device_kind, "devices": int(mesh.devices.size),
            "processes": jax.process_count(), "memory": int(memory)}


def free_memory(mesh) -> int:
    """Bytes the search may use now: on an accelerator the smallest local device's free
    memory (bytes_limit - bytes_in_use; 0 when unknown), on CPU a quarter of the host's
    memory -- all of it, not what is available now, which moves with whatever else runs and
    would move the cohort size, and with it float order and the numbers."""
    if on_cpu(mesh):
        return int(CPU_MEMORY_SHARE * machine(mesh)["memory"])
    free = []
    for d in local_devices(mesh):
        stats = d.memory_stats() or {}
        if "bytes_limit" not in stats:
            return 0
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return int(min(free))


def cache_on_device(cache_bytes: int, mesh, free: int) -> bool:
    """Whether a prefix cache (or an engine's uint8 images) of `cache_bytes`, whole on every
    device, goes into device memory: on CPU always; elsewhere within CACHE_SHARE of the free
    memory."""
    return on_cpu(mesh) or (free > 0 and cache_bytes <= CACHE_SHARE * free)


def device_split_bytes(engine: train.Engine, images: int, image_shape) -> int:
    """Bytes of `images` images as the engine's steps would gather them in device memory: the
    prefix cache's features, or the uint8 images of an engine without a cache -- those only
    on an accelerator (on CPU the fed batches are in that memory already: 0, fed)."""
    if engine.cached:
        return engine.feature_bytes(images)
    return 0 if on_cpu(engine.mesh) else images * math.prod(image_shape)


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


def live_state_bytes(engine: train.Engine, variables) -> int:
    """Bytes of one run's live parameters and BN statistics."""
    return train.tree_bytes((engine.live_part(variables["params"]),
                             engine.live_part(variables.get("batch_stats", {}))))


def largest_cohort(engine: train.Engine, variables, parallel: int, runs: int,
                   speedup: Callable[[int], float] | None = None) -> tuple[int, dict]:
    """The largest cohort worth compiling, and the caps that set it: the runs to train,
    `parallel` when >= 1 (0: no cap of its own), MAX_COHORT, and on CPU the runs whose live
    state (x4: params, two moments, gradients) fits in the last-level cache -- a step reads
    and writes all of it, and beyond that the per-run step time grows (demo, 2-core EPYC, 32 MiB
    L3, 4.5 MB per run: 4.9 ms per run-step at K=4-8, 7.1 ms at K=16-38) -- and one run
    a device ('CPU speed-up') where `speedup(k)`, k runs vmapped on a device against one run
    there (run-steps a second, this machine), is below MIN_CPU_COHORT_SPEEDUP for a device's
    share of the widest cohort (None: not known, no such cap). Within the caps, the
    runs go in as few cohorts as they allow, of equal size: a padded run computes every step
    for nothing (12 runs under a cap of 5: three cohorts of 4, not 5, 5 and 2 padded to 5)."""
    if parallel < 0:
        raise ValueError(f"parallel={parallel}: use 0 (as memory allows) or a cohort size >= 1.")
    caps = {"runs": max(int(runs), 1), "maximum": MAX_COHORT}
    if parallel >= 1:
        caps["search.parallel"] = parallel
    elif on_cpu(engine.mesh):
        caps["CPU cache"] = max(1, last_level_cache_bytes() // max(
            4 * live_state_bytes(engine, variables), 1))
        # A device's share of the widest cohort is what it would vmap (the rest are on the
        # other devices of the 'runs' axis, one device per physical core on a CPU).
        per_device = -(-int(min(caps.values())) // engine.mesh.shape["runs"])
        if (speedup is not None and per_device > 1
                and speedup(per_device) < MIN_CPU_COHORT_SPEEDUP):
            caps["CPU speed-up"] = 1
    cap = int(min(caps.values()))
    runs = max(int(runs), 1)
    return round_up(-(-runs // -(-runs // cap)), engine.mesh.shape["runs"]), caps


def round_up(size: int, positions: int) -> int:
    """A cohort size filling the mesh's `positions` along 'runs' evenly (padded runs fill the
    rest): the multiple of `positions` at or above `size`."""
    return -(-size // positions) * positions


def balanced_size(runs: int, placed: int, positions: int = 1) -> int:
    """The cohort size that trains `runs` in as few cohorts as the placed size allows, of
    equal size (24 runs placed in cohorts of 11: three of 8, not 11, 11 and 2 padded to 11)."""
    cohorts = -(-max(runs, 1) // placed)
    return min(placed, round_up(-(-max(runs, 1) // cohorts), positions))


def padding_worth_cutting(runs: int, placed: int, size: int, epochs: int, cpu: bool) -> bool:
    """Whether to train `runs` for `epochs` in cohorts of `size` rather than the placed size,
    at the cost of compiling that size. On CPU a padded run costs about what a real one does
    (a cohort's step time grows with its runs: 28 runs of the tiny search's whole network, 4.5 s
    an epoch; 2 runs, 0.7 s), and compiling a size up to PADDING_COHORT_EPOCHS epochs of a full
    cohort: cut when the padded run-epochs saved amount to that many. On an accelerator a
    padded run fills otherwise idle lanes: never."""
    if not cpu or size >= placed:
        return False
    padded = -(-runs // placed) * placed - -(-runs // size) * size
    return padded * epochs >= PADDING_COHORT_EPOCHS * placed


def fit_to_memory(compile_for: Callable[[int, int], dict], size: int, *, free: int,
                  resident: Callable[[int], int], fixed: int, cpu: bool,
                  step: int = 1) -> tuple[int, int, dict]:
    """The largest cohort size <= `size` and evaluation multiple whose compiled programs fit:
    `compile_for(k, multiple)` compiles the real steps and returns their bytes ({'train',
    'eval'}); `resident(k)` is what stays in memory beside them (best variables, the prefix
    cache); `fixed` the part of a program that does not grow with k (frozen variables, the
    cache). The train step sets the cohort size (shrunk by its measured bytes per run), then
    the evaluation batch shrinks, then the cohort again, always to a multiple of `step` (the
    mesh's 'runs' positions). Returns (size, eval multiple, figures); `size` counts all
    devices' runs, the bytes are one device's."""
    multiple = EVAL_BATCH_MULTIPLES[0]
    while True:
        memory = compile_for(size, multiple)
        need = {kind: memory[kind] + resident(size) for kind in ("train", "eval")}
        # A device holds size / step of the runs: the bytes per run are per device.
        per_run = {kind: max((need[kind] - fixed) // (size // step), 1) for kind in need}
        figures = {"free": free, "train": need["train"], "eval": need["eval"],
                   "per_run": per_run["train"]}
        if free <= 0 or max(need.values()) <= free:
            return size, multiple, figures
        smaller = lambda kind: max(step, min(size - step,
                                             (free - fixed) // per_run[kind] * step))
        if need["train"] > free and size > step:
            size = smaller("train")
        elif multiple > EVAL_BATCH_MULTIPLES[-1]:
            multiple = EVAL_BATCH_MULTIPLES[EVAL_BATCH_MULTIPLES.index(multiple) + 1]
        elif size > step:
            size = smaller("eval")
        else:
            # One run does not fit by XLA's plan: try it anyway (the plan may be pessimistic,
            # and on CPU the budget is a share of the memory), and say so.
            log.warning("One run of this engine needs %.1f MB by XLA's memory plan, more than "
                        "the %.1f MB %s; trying anyway. If it runs out of memory: lower "
                        "data.batch_size, or use train.compute_dtype=bfloat16.",
                        max(need.values()) / 2**20, free / 2**20,
                        "allowed on CPU" if cpu else "free on the device")
            return size, multiple, figures


def first(engine: train.Engine, variables, parallel: int, runs: int, cache_bytes: int,
          kept: Placement | None, speedup: Callable[[int], float] | None = None) -> dict:
    """Process 0's start, before anything is compiled: where the prefix cache goes
    (`cache_bytes`; 0: no cache), the cohort size to compile first (the largest worth having;
    `speedup`: see `largest_cohort`) and the evaluation multiple; or, with a `kept`
    placement, its own."""
    if kept is not None:
        return {"cache_on_device": kept.cache_on_device, "size": kept.cohort_size,
                "multiple": kept.eval_batch_multiple, "caps": kept.figures.get("caps")}
    size, caps = largest_cohort(engine, variables, parallel, runs, speedup)
    on_device = bool(cache_bytes) and cache_on_device(cache_bytes, engine.mesh,
                                                      free_memory(engine.mesh))
    return {"cache_on_device": on_device, "size": size, "multiple": EVAL_BATCH_MULTIPLES[0],
            "caps": caps}


def decide(engine: train.Engine, variables, compile_for: Callable[[int, int], dict],
           size: int, cache_bytes: int, caps: dict, free: int | None = None,
           machine_: dict | None = None) -> Placement:
    """Process 0's placement of an engine's runs: the cohort size (at most `size`) and
    evaluation multiple whose compiled steps (`compile_for(k, multiple)`) fit the memory free
    now, beside each run's best variables and the prefix cache in device memory
    (`cache_bytes`, counted again: a program's arguments hold only one split of it).
    `free` and `machine_`: another machine's (`target`); default: this one's, measured."""
    live = live_state_bytes(engine, variables)
    frozen = train.tree_bytes((engine.frozen_part(variables["params"]),
                               engine.frozen_part(variables.get("batch_stats", {}))))
    if engine.anchored:  # L2-SP's starting weights, once beside the runs
        frozen += train.tree_bytes(engine.anchor(variables["params"]))
    positions = engine.mesh.shape["runs"]  # a device holds 1/positions of the runs
    size, multiple, figures = fit_to_memory(
        compile_for, size, free=free_memory(engine.mesh) if free is None else free,
        resident=lambda k: k // positions *
        live + cache_bytes, fixed=frozen + cache_bytes, cpu=on_cpu(engine.mesh), step=positions)
    return Placement(size, bool(cache_bytes), multiple, machine_ or machine(engine.mesh),
                     {**figures, "caps": caps}, train.layout(engine.mesh))


def kept(workdir: Path, unit: str, mesh) -> Placement | None:
    """The placement cohorts.json keeps for engine `unit`, when it was decided for this kind
    of machine (then a resumed search forms the same cohorts); else None: decide again.
    Read on process 0, the same on every process."""
    def read():
        path = Path(workdir) / COHORTS
        decided = (json.loads(path.read_text()) if path.exists() else {}).get(unit)
        if isinstance(decided, dict) and decided.get("machine") == machine(mesh) and \
                "layout" in decided:  # (decided before layouts: decide again)
            return decided
        return None
    decided = multihost.broadcast_json(read)
    return Placement(**{**decided, "layout": tuple(decided["layout"])}) if decided else None


def keep(workdir: Path, unit: str, decided: Placement) -> None:
    """Records engine `unit`'s placement in cohorts.json (on process 0)."""
    path = Path(workdir) / COHORTS
    kept_ = json.loads(path.read_text()) if path.exists() else {}
    kept_[unit] = decided.to_json()
    write_atomic(path, json.dumps(kept_, indent=2))


def describe(unit: str, placement: Placement, runs: int) -> str:
    f = placement.figures
    mb = lambda key: f"{f[key] / 2**20:,.1f} MB" if key in f else "?"
    return (f"Runs from unit {unit}: {runs}, in cohorts of {placement.cohort_size} "
            f"(caps {f.get('caps')}); prefix cache "
            f"{'in device memory' if placement.cache_on_device else 'on the host'}; evaluation "
            f"batch x{placement.eval_batch_multiple}. Memory by XLA's plan: train {mb('train')}, "
            f"eval {mb('eval')} ({mb('per_run')} a run) of {mb('free')} available on "
            f"{placement.machine['devices']} x {placement.machine['device']}, laid out as "
            f"{placement.layout[0]} runs x {placement.layout[1]} data (a run's batch over "
            f"{placement.layout[1]} device(s))")
