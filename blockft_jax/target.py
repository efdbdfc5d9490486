"""`--dry_run --target tpu:<generation>:<topology>`: the search's real train and eval steps
compiled for a TPU slice on the machine at hand, and what they would cost there.

As MaxText's `train_compile.py` does: with libtpu installed (`pip install -e '.[tpu]'`),
`jax.experimental.topologies.get_topology_desc` describes a slice's devices without the slice,
and `jit(...).lower(...).compile()` on a Mesh of them gives the real TPU executable, whose
`memory_analysis()` (argument, temporary and output bytes per chip) and `cost_analysis()`
(flops and bytes accessed per chip) are XLA's own. The layout and cohort size come from the
same decisions the search makes on a real slice (`placement.layout`, `placement.decide`),
with the chip's HBM as the memory free. A step's time is a roofline: the slower of its flops
at the chip's peak bfloat16 rate and its bytes at the chip's HBM bandwidth (a lower bound:
real steps also wait on dispatch, collectives and imperfect overlap).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import time
from typing import Callable, Sequence

import jax

from blockft_jax import models
from blockft_jax.candidates import groups
from blockft_jax.common import progress
from blockft_jax.common.errors import UserError
from blockft_jax.engine import cohort as cohort_lib
from blockft_jax.engine import ahead, placement, train
from blockft_jax.models import layers
from blockft_jax.search import costs
from blockft_jax.search import plan as plan_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published figures per chip."""
    name: str
    bf16_flops: float       # peak bfloat16 FLOP/s
    hbm_bandwidth: float    # bytes/s
    hbm_bytes: int
    chip_config: str        # get_topology_desc's chip_config_name: 'megacore' = 1 device a chip
    accelerator_type: str   # a slice of this generation, as a TPU VM names it
    source: str


GIB = 2**30
# Google Cloud's TPU system architecture pages (retrieved 2025).
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 1200e9, 32 * GIB, "megacore", "v4-8",
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * GIB, "default", "v5litepod-8",
                "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * GIB, "megacore", "v5p-8",
                "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32 * GIB, "default", "v6e-8",
                "https://cloud.google.com/tpu/docs/v6e"),
}


class TargetError(UserError, ValueError):
    """A --target that cannot be compiled for (its name, or no libtpu)."""


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One compiled step (a whole cohort's) on one device, as XLA planned it."""
    flops: float
    bytes_accessed: float
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int

    @property
    def memory(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


@dataclasses.dataclass(frozen=True)
class EngineCost:
    """An engine's runs as a search trains them: `runs` runs at once at most (its first rung's),
    `run_epochs` epochs of runs in all (the schedule's), in cohorts of `cohort_size`; its train
    step and eval step (evaluation batches `eval_batch_multiple` x the training batch) per
    device; Auto-RGN's measurements, (runs, epochs, batches an epoch) for each candidate."""
    unit: str
    runs: int
    run_epochs: float
    cohort_size: int
    eval_batch_multiple: int
    train_step: StepCost
    eval_step: StepCost
    measurements: tuple[tuple[int, int, int], ...] = ()


def step_cost(compiled) -> StepCost:
    """The per-device cost of a compiled program (`jit(...).lower(...).compile()`)."""
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return StepCost(float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)),
                    m.argument_size_in_bytes, m.temp_size_in_bytes, m.output_size_in_bytes,
                    m.alias_size_in_bytes)


def roofline(cost: StepCost, chip: Chip) -> float:
    """Seconds of a step on `chip`: its flops at peak or its bytes at the HBM bandwidth,
    whichever takes longer."""
    return max(cost.flops / chip.bf16_flops, cost.bytes_accessed / chip.hbm_bandwidth)


def search_seconds(engines: Sequence[EngineCost], images: tuple[int, int, int],
                   batch_size: int, step_seconds: Callable[[StepCost], float]) -> dict:
    """The search's training time: every engine's cohort-epochs (its run-epochs over its
    cohort size, rounded up) of train steps and a validation, one test evaluation per cohort of
    its runs, and Auto-RGN's measurement batches every epoch of its cohorts (a forward and
    backward pass: at the train step's time), at `step_seconds(cost)` a step (e.g. `lambda
    cost: roofline(cost, chip)`). `images`: (train, validation, test). Returns {'seconds',
    unit: seconds per engine}. Not counted: compiling, the prefix caches' forward pass, a
    halving schedule's extra test evaluations at its rungs, early stops (diverged runs)."""
    train_images, validation, test = images
    out = {}
    train_steps = -(-train_images // batch_size)
    for e in engines:
        eval_batch = batch_size * e.eval_batch_multiple
        epoch = (train_steps * step_seconds(e.train_step)
                 + -(-validation // eval_batch) * step_seconds(e.eval_step))
        measuring = sum(epochs * -(-runs // e.cohort_size) * min(batches, train_steps)
                        for runs, epochs, batches in e.measurements)
        out[e.unit] = (math.ceil(e.run_epochs / e.cohort_size) * epoch
                       + -(-e.runs // e.cohort_size) * -(-test // eval_batch)
                       * step_seconds(e.eval_step)
                       + measuring * step_seconds(e.train_step))
    return {"seconds": sum(out.values()), **out}


# --- the slice ---------------------------------------------------------------------------------

def parse(target: str) -> tuple[Chip, str, str]:
    """'tpu:v5e:2x4' -> (its Chip, 'v5e', 'v5e:2x4')."""
    platform, _, topology = target.partition(":")
    generation = topology.partition(":")[0]
    if platform != "tpu" or ":" not in topology:
        raise TargetError(f"--target={target!r}: use tpu:<generation>:<topology>, e.g. "
                          f"tpu:v5e:2x4 or tpu:v4:2x2x4.")
    if generation not in CHIPS:
        raise TargetError(f"--target={target!r}: unknown TPU generation {generation!r}; "
                          f"choose one of {', '.join(CHIPS)}.")
    return CHIPS[generation], generation, topology


def slice_devices(target: str) -> tuple[Chip, list]:
    """The chip and the devices of a TPU slice, described by libtpu (no TPU needed). Hosts
    hold 2x2x1 chips, as on real slices; v5e and v6e slices of 8 chips or fewer are one host."""
    chip, generation, topology = parse(target)
    if importlib.util.find_spec("libtpu") is None:
        raise TargetError(f"--target compiles for TPUs with libtpu, which is not installed: "
                          f"pip install -e '.[tpu]' (jax[tpu]=={jax.__version__}).")
    # libtpu locks the machine's TPUs for one process; here there are none to guard, and
    # several processes (tests, two dry runs) may describe slices at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if os.environ.get("TPU_SKIP_MDS_QUERY") == "1":
        # No TPU here (jax's cloud_tpu_init found none and asks libtpu not to query the VM's
        # metadata): name a slice, or libtpu prints three lines of warnings about the VM it
        # is not on. The slice compiled for is get_topology_desc's, whatever these say.
        for name, value in (("TPU_ACCELERATOR_TYPE", chip.accelerator_type),
                            ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0")):
            os.environ.setdefault(name, value)
    from jax.experimental import topologies
    try:
        shape = [int(x) for x in topology.partition(":")[2].split("x")]
    except ValueError:
        raise TargetError(f"--target={target!r}: the topology is chips per axis, e.g. 2x4 "
                          f"or 2x2x4.") from None
    chips = math.prod(shape)
    bounds = ((*shape, 1)[:3] if generation in ("v5e", "v6e") and chips <= 8
              else (2, 2, 1))
    try:
        described = topologies.get_topology_desc(
            platform="tpu", topology_name=topology, chip_config_name=chip.chip_config,
            chips_per_host_bounds=tuple(bounds), num_slices=1)
    except Exception as e:  # libtpu says what it refuses; keep its first line
        raise TargetError(f"--target={target!r}: libtpu cannot describe this slice: "
                          f"{str(e).splitlines()[0]}") from None
    return chip, list(described.devices)


# --- the search's steps compiled for it ------------------------------------------------------

def dataset_images(config) -> tuple[int, int, int, int]:
    """(train, validation, test, classes) of the search's dataset without loading it
    (plan.dataset_sizes), or an error saying which datasets that works for."""
    sizes = plan_lib.dataset_sizes(config)
    if sizes is None:
        raise TargetError(f"--target needs the dataset's size before loading it; it is known "
                          f"for an image folder, the digits and "
                          f"{', '.join(plan_lib.TFDS_SIZES)} (carved by data.splits), not "
                          f"{config.data.name!r}.")
    return sizes


def tpu_module(config, num_classes: int):
    """The search's model as a TPU builds it: the layers' 'auto' implementations resolve by
    the backend that traces them, which here is this machine's (on CPU: shifted multiply-adds
    for depthwise convolutions, matmuls for 1x1 ones), so they are resolved for the TPU."""
    config = config.copy_and_resolve_references()
    options = config.model.options
    options.depthwise_impl = layers.resolve_depthwise_impl(options.depthwise_impl or "auto",
                                                           "tpu")
    options.conv_impl = layers.resolve_conv_impl(options.conv_impl or "auto", "tpu")
    return plan_lib.build_module(config, num_classes)


def engine_cost(config, module, table, variables, tx, devices, unit: str, work: dict,
                images: tuple[int, int, int], memory: int, device_name: str
                ) -> tuple[EngineCost, placement.Placement]:
    """The engine from `unit` training its `work` (plan.engine_work's: 'runs', 'run_epochs')
    on `devices` (a slice's, or this machine's: `jax.devices()`): its layout and cohort size
    decided by the search's own rules with `memory` bytes free per device, and its train and
    eval steps compiled there, with their per-device cost. `images`: (train, validation,
    test); `variables` may be shapes only."""
    runs = work["runs"]
    c = config
    shape = (c.model.input_size, c.model.input_size, 3)
    at_once = plan_lib.at_once(c, runs)
    mask = groups.param_mask(variables["params"], table, [])
    bn_modes = groups.bn_modes(table, [])
    engines, cohorts, compiled = {}, {}, {}

    def engine_for(layout):
        if layout not in engines:
            engines[layout] = plan_lib.engine(c, module, tx, table, unit, devices, layout[0],
                                              work["anchored"], prefix_chunk_bytes=None)
        return engines[layout]

    def cache_bytes(engine) -> int:  # in device memory when it fits, as the search decides
        nbytes = placement.device_split_bytes(engine, sum(images), shape)
        return nbytes if nbytes and placement.cache_on_device(nbytes, engine.mesh,
                                                              memory) else 0

    def compile_for(layout, k: int, multiple: int) -> dict:
        if (layout, k, multiple) not in compiled:
            engine = engine_for(layout)
            cohort = cohort_lib.Cohort(engine, k)
            sizes = (dict(zip(("train", "validation", "test"), images))
                     if cache_bytes(engine) else None)
            log.info("Compiling the steps from %s for %s: %d runs, layout %s, evaluation "
                     "batch x%d", unit, device_name, k, layout, multiple)
            compiled[layout, k, multiple] = ahead.compile_steps(
                cohort, variables, mask, bn_modes, c.data.batch_size, shape, sizes, multiple)
            cohorts[layout, k, multiple] = cohort
        return compiled[layout, k, multiple]

    decisions = {}

    def decide(layout) -> placement.Placement:  # as the search decides, `memory` free
        if layout not in decisions:
            engine = engine_for(layout)
            size, caps = placement.largest_cohort(engine, variables, c.search.parallel, at_once)
            decisions[layout] = placement.decide(
                engine, variables, lambda k, multiple: compile_for(layout, k, multiple), size,
                cache_bytes(engine), caps, free=memory,
                machine_={"device": device_name, "devices": len(devices),
                          "processes": len({d.process_index for d in devices}),
                          "memory": memory})
        return decisions[layout]

    def fits(layout) -> bool:  # its cohort's steps, beside what stays resident, fit
        figures = decide(layout).figures
        return max(figures["train"], figures["eval"]) <= memory

    layout = placement.layout(len(devices), at_once, c.data.batch_size, fits)
    decided = decide(layout)
    cohort = cohorts[layout, decided.cohort_size, decided.eval_batch_multiple]
    return EngineCost(unit, runs, work["run_epochs"], decided.cohort_size,
                      decided.eval_batch_multiple,
                      step_cost(cohort.executables["train"]),
                      step_cost(cohort.executables["eval"]),
                      tuple(work["measurements"])), decided


def report(config, target: str) -> str:
    """What `--dry_run --target` prints: per engine, the layout and cohort size the search
    would choose on the slice, its steps' memory per chip against the chip's HBM, flops and
    bytes per step, the roofline step times, and the whole search's estimated time. The
    engines by depth are split (costs.split) from the slice's speed: the roofline seconds per
    flop of one engine's compiled train step, and its compile time here."""
    chip, devices = slice_devices(target)
    c = config
    *images, classes = dataset_images(c)
    images = tuple(images)
    module = tpu_module(c, classes)
    shape = (c.model.input_size, c.model.input_size, 3)
    table = models.layer_table(module, shape)
    variables = models.variable_shapes(module, shape)
    tx = train.make_optimizer(c.train, train.total_steps(c, images[0]))
    hosts = len({d.process_index for d in devices})
    lines = [f"Target {target}: {len(devices)} x {chip.name} on {hosts} host(s); "
             f"{chip.hbm_bytes / GIB:.0f} GiB HBM, {chip.bf16_flops / 1e12:.0f} TFLOP/s "
             f"bfloat16, {chip.hbm_bandwidth / 1e9:,.0f} GB/s a chip ({chip.source}). "
             f"{c.model.name} at {c.model.input_size} px, {c.train.compute_dtype}, batch "
             f"{c.data.batch_size}; {images[0]:,} train, {images[1]:,} validation, "
             f"{images[2]:,} test images."]
    compiled = {}

    def cost_of(plan, unit: str):
        work = plan_lib.engine_work(plan)[unit]
        if (unit, work["runs"]) not in compiled:
            started = time.perf_counter()
            cost, decided = engine_cost(c, module, table, variables, tx, devices, unit, work,
                                        images, chip.hbm_bytes, chip.name)
            compiled[unit, work["runs"]] = cost, decided, time.perf_counter() - started
        cost, decided, seconds = compiled[unit, work["runs"]]
        return dataclasses.replace(cost, run_epochs=work["run_epochs"],
                                   measurements=tuple(work["measurements"])), decided, seconds

    # The candidates but the whole network's in one engine, until the split below.
    plan = plan_lib.make_plan(c, table, module)
    if c.search.engines > 1 and len({plan.lowest_unit(g) for g in plan.shared}) > 1:
        probe, _, seconds = cost_of(plan, plan.engines[0])
        step = probe.train_step
        speed = costs.Speed(roofline(step, chip) / max(step.flops, 1.0), seconds,
                            f"the train step from {probe.unit} compiled for {target}")
        plan = plan_lib.make_plan(c, table, module, speed=speed, images=images[:2])
        lines.append(f"Engines by depth: candidates but the whole network's train from units "
                     f"{', '.join(plan.engines)} (at most search.engines={c.search.engines}; "
                     f"split from the roofline of the train step from {probe.unit}, "
                     f"{speed.seconds_per_flop * 1e15:.3g} s per PFLOP, and its compile time "
                     f"here, {seconds:.0f} s).")
    engine_costs = []
    for unit in sorted(plan.from_units, key=plan.units.index, reverse=True):
        cost, decided, _ = cost_of(plan, unit)
        engine_costs.append(cost)
        lines.extend(_engine_lines(c, plan, cost, decided, chip))
    total = search_seconds(engine_costs, images, c.data.batch_size,
                           lambda cost: roofline(cost, chip))
    lines.append(f"Estimated search time on {target} (roofline, training and evaluation "
                 f"only): {_duration(total['seconds'])} ("
                 + ", ".join(f"{e.unit} {_duration(total[e.unit])}" for e in engine_costs)
                 + ").")
    return "\n".join(lines)


def _engine_lines(c, plan, cost: EngineCost, decided: placement.Placement, chip) -> list[str]:
    """`report`'s lines for one engine on the slice: its runs, layout and inputs; its train and
    eval steps' memory per chip, flops, bytes and roofline."""
    mb = lambda n: f"{n / 2**20:,.0f} MB"
    lines = []
    t, e = cost.train_step, cost.eval_step
    cached = plan_lib.caches_prefix(c, cost.unit, plan.units)
    inputs = (f"{'prefix cache' if cached else 'uint8 images'} "
              f"{'in HBM' if decided.cache_on_device else 'fed by the host'}")
    bound = ("compute" if t.flops / chip.bf16_flops >= t.bytes_accessed / chip.hbm_bandwidth
             else "memory")
    lines.append(
        f"On the slice, engine from {cost.unit}: {cost.runs} runs in cohorts of "
        f"{cost.cohort_size}, laid out {decided.layout[0]} runs x {decided.layout[1]} "
        f"data; {inputs}; {cost.run_epochs:,.0f} run-epochs ({c.search.schedule} schedule)"
        + "".join(f"; Auto-RGN measures {batches} batch(es) an epoch for {runs} run(s)"
                  for runs, _, batches in cost.measurements) + ".")
    lines.append(
        f"  train step per chip: arguments {mb(t.argument_bytes)}, temporaries "
        f"{mb(t.temp_bytes)}, outputs {mb(t.output_bytes)} (of which reused "
        f"{mb(t.alias_bytes)}): {mb(t.memory)} of {mb(chip.hbm_bytes)} HBM; "
        f"{t.flops / 1e9:,.1f} GFLOP, {t.bytes_accessed / 1e9:,.2f} GB accessed; roofline "
        f"{roofline(t, chip) * 1e3:,.2f} ms ({bound}-bound).")
    lines.append(
        f"  eval step per chip (batch x{cost.eval_batch_multiple}): {mb(e.memory)}; "
        f"{e.flops / 1e9:,.1f} GFLOP, {e.bytes_accessed / 1e9:,.2f} GB; roofline "
        f"{roofline(e, chip) * 1e3:,.2f} ms.")
    return lines


def _duration(seconds: float) -> str:
    """Under a minute to three figures (a slice's searches are short); else progress.duration."""
    seconds = float(seconds)
    return f"{seconds:.3g} s" if seconds < 60 else progress.duration(round(seconds))
