"""A search's engines: one per lowest trainable unit, each with its inputs, its steps compiled
in the background (one compiler thread, one engine after another; Auto-RGN's measurement on a
second, beside the steps it goes with) and its placement.

An engine is prepared before it trains (its prefix cache computed, its steps for the largest
cohort worth having compiling), made ready when its first cohort is due (the placement decided
on process 0 from the compiled steps and kept in the workdir, the placed cohort's steps
compiled), and released when its runs are done.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Callable

from blockft_jax.candidates import groups, strategies
from blockft_jax.common import multihost
from blockft_jax.common.progress import CompileClock
from blockft_jax.common.workdir import Workdir
from blockft_jax.engine import cohort as cohort_lib
from blockft_jax.engine import ahead, placement, train
from blockft_jax.search import costs
from blockft_jax.search import plan as plan_lib

log = logging.getLogger(__name__)


class Engines:
    """The engines of one search, by their lowest trainable unit (`engines[unit]`)."""

    def __init__(self, config, module, tx, table, mesh, plan, variables, dataset, wd: Workdir,
                 clock: CompileClock, speed: Callable[[], costs.Speed]):
        self.config, self.module, self.tx, self.table = config, module, tx, table
        self.mesh, self.plan, self.variables = mesh, plan, variables
        self.dataset, self.wd, self.clock = dataset, wd, clock
        self.speed = speed  # the machine's, measured on first call
        self.shape = (config.model.input_size, config.model.input_size, 3)
        self.prepared: dict[str, placement.Prepared] = {}
        self.compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
        # Auto-RGN's measurement, a whole backward pass of its own, compiles beside its engine's
        # steps instead of after them: a rung that waits for both waits for the longer.
        self.norms_compiler = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="compile-norms")
        self.ahead: dict[tuple, concurrent.futures.Future] = {}  # (unit, (size, multiple))

    def __getitem__(self, unit: str) -> placement.Prepared:
        return self.prepared[unit]

    def __contains__(self, unit: str) -> bool:
        return unit in self.prepared

    def compilations(self) -> dict:
        """This process's compilations per engine."""
        return {unit: p.compilations() for unit, p in self.prepared.items()}

    def shutdown(self) -> None:
        self.compiler.shutdown(cancel_futures=True)
        self.norms_compiler.shutdown(cancel_futures=True)

    def prepare(self, from_unit: str, runs: int) -> placement.Prepared:
        """The engine for a lowest trainable unit, its inputs, and its steps compiling in the
        background for the largest cohort worth having (`runs` of it to train)."""
        if from_unit in self.prepared:
            return self.prepared[from_unit]
        c = self.config
        kept = placement.kept(self.wd.path, from_unit, self.mesh)
        layout = kept.layout if kept else tuple(multihost.broadcast_json(lambda: placement.layout(
            self.mesh.devices.size, plan_lib.at_once(c, runs), c.data.batch_size)))
        engine = plan_lib.engine(c, self.module, self.tx, self.table, from_unit,
                                 self.mesh.devices, layout[0], self.plan.anchored(from_unit),
                                 train.default_prefix_chunk_bytes())
        splits = {"train": self.dataset.train, "validation": self.dataset.validation,
                  "test": self.dataset.test}
        images = sum(map(len, splits.values()))
        speedup = self._speedup(engine) if kept is None else None  # (every process measures)
        start = lambda: placement.first(engine, self.variables, c.search.parallel, runs,
                                        placement.device_split_bytes(engine, images, self.shape),
                                        kept, speedup)
        begun = multihost.broadcast_json(start)
        cohort = cohort_lib.Cohort(engine, begun["size"])
        sizes = {k: len(v) for k, v in splits.items()} if begun["cache_on_device"] else None
        log.info("Compiling the steps for runs from unit %s (%d at once; in the background)",
                 from_unit, cohort.size)
        compiling = self.compiler.submit(self.compile, cohort, sizes, begun["multiple"])
        prepared = placement.Prepared(engine, splits, runs, {cohort.size: cohort}, {}, compiling,
                                      begun["cache_on_device"], begun["caps"], kept)
        if engine.cached:
            started = time.perf_counter()
            prepared.splits = {k: engine.features(self.variables, v, c.data.batch_size)
                               for k, v in splits.items()}
            nbytes = sum(s.images.nbytes for s in prepared.splits.values())
            log.info("Prefix cache: units below %s computed once per image (%.1f MB in "
                     "%s memory, %.1f s)", from_unit, nbytes / 2**20,
                     "device" if prepared.cache_on_device else "host",
                     time.perf_counter() - started)
        elif prepared.cache_on_device:
            log.info("Images (uint8) in device memory for runs from unit %s: %.1f MB",
                     from_unit, sum(s.images.nbytes for s in splits.values()) / 2**20)
        if prepared.cache_on_device:
            prepared.splits = {k: engine.to_device(v) for k, v in prepared.splits.items()}
        self.prepared[from_unit] = prepared
        return prepared

    def _speedup(self, engine: train.Engine) -> Callable[[int], float] | None:
        """On CPU, with search.parallel=0: a cohort of k's speed-up per run over one run for
        this engine's train step, by the machine's measured speed (logged where it keeps the
        runs one at a time). Elsewhere None: the placement needs none."""
        if self.config.search.parallel or not placement.on_cpu(engine.mesh):
            return None
        speed = self.speed()
        flops = 3 * self.config.data.batch_size * costs.suffix_flops(
            self.table, self.variables, self.module.unit_names())[engine.from_unit]

        def speedup(k: int) -> float:
            gain = speed.cohort_speedup(flops, k)
            if gain < placement.MIN_CPU_COHORT_SPEEDUP:
                log.info("Runs from unit %s: one at a time on each device, not in cohorts of "
                         "%d a device (by this machine's measured speed a cohort would train "
                         "%.2fx faster per run, below %.1fx)", engine.from_unit, k, gain,
                         placement.MIN_CPU_COHORT_SPEEDUP)
            return gain
        return speedup

    def compile(self, cohort: cohort_lib.Cohort, device_split_sizes, multiple: int) -> dict:
        """A cohort's steps compiled ahead (any candidate's mask: only structure matters):
        their memory by XLA's plan, and the train step's flops per run."""
        c = self.config
        any_mask = groups.param_mask(self.variables["params"], self.table, [])
        any_bn = groups.bn_modes(self.table, [])
        return ahead.compile_steps(cohort, self.variables, any_mask, any_bn, c.data.batch_size,
                                   self.shape, device_split_sizes, multiple)

    def ready(self, from_unit: str) -> placement.Prepared:
        """The engine with its placement decided (process 0, from its compiled steps) and its
        cohort's steps compiled."""
        prepared = self.prepared[from_unit]
        if prepared.compiling is not None:
            with self.clock.waiting():
                memory = prepared.compiling.result()
            prepared.compiling = None
            first = next(iter(prepared.cohorts.values()))
            multiple = (prepared.placement.eval_batch_multiple if prepared.placement
                        else cohort_lib.EVAL_BATCH_MULTIPLE)
            prepared.compiled[first.size, multiple] = memory
        if prepared.placement is None:
            prepared.placement = placement.Placement(**multihost.broadcast_json(
                lambda: self._decide(prepared).to_json()))
            if self.wd.writer:
                placement.keep(self.wd.path, from_unit, prepared.placement)
        p = prepared.placement
        if p.cohort_size not in prepared.cohorts:
            prepared.cohorts[p.cohort_size] = cohort_lib.Cohort(prepared.engine, p.cohort_size)
        if (p.cohort_size, p.eval_batch_multiple) not in prepared.compiled:
            with self.clock.waiting():
                prepared.compiled[p.cohort_size, p.eval_batch_multiple] = self.compile(
                    prepared.cohort, self.split_sizes(prepared), p.eval_batch_multiple)
        if prepared.norms is None and self._measures(from_unit):
            prepared.norms = self.norms_compiler.submit(
                ahead.compile_norms, prepared.cohort, self.variables,
                groups.bn_modes(self.table, []),
                self.config.data.batch_size, self.shape, self.split_sizes(prepared))
        if not prepared.announced:
            log.info(placement.describe(from_unit, p, prepared.runs))
            prepared.announced = True
        return prepared

    def compile_ahead(self, runs: dict[str, int], epochs: int) -> None:
        """Starts compiling, in the background and in the order given, the cohort sizes that
        `cohort_for` will ask of the placed engines among `runs` (each engine's runs in a rung
        or a round): the first engine's is waited for, the later ones' compile while the
        engines before them train."""
        for unit, count in runs.items():
            prepared = self.prepared.get(unit)
            if prepared is None or prepared.placement is None or prepared.compiling is not None:
                continue  # placed and its placed size compiled when its first cohort is due
            size = self._size(prepared, count, epochs)
            key = (size, prepared.placement.eval_batch_multiple)
            if (size == prepared.placement.cohort_size or key in prepared.compiled
                    or (unit, key) in self.ahead):
                continue
            _announce_cut(unit, count, size, prepared.placement.cohort_size, " in the background")
            cohort = prepared.cohorts.setdefault(size, cohort_lib.Cohort(prepared.engine, size))
            self.ahead[unit, key] = self.compiler.submit(self._compile_size, unit, cohort)

    def cohort_for(self, from_unit: str, runs: int, epochs: int) -> cohort_lib.Cohort:
        """The cohort that trains a rung's (or a round's) `runs` of an engine, all of them,
        finished or not, for up to `epochs` epochs: the placed size, or on CPU the balanced
        size below it when the padded runs it saves are worth compiling it
        (`placement.padding_worth_cutting`; compiled ahead where `compile_ahead` could).
        Decided from counts alone: a rerun, or the same command on a loaded machine, forms
        cohorts of the same sizes (and so the same numbers)."""
        prepared = self.ready(from_unit)
        size = self._size(prepared, runs, epochs)
        key = (size, prepared.placement.eval_batch_multiple)
        cohort = prepared.cohorts.setdefault(size, cohort_lib.Cohort(prepared.engine, size))
        if key not in prepared.compiled:
            compiling = self.ahead.pop((from_unit, key), None)
            if compiling is None:
                _announce_cut(from_unit, runs, size, prepared.placement.cohort_size)
            with self.clock.waiting():
                prepared.compiled[key] = (compiling.result() if compiling
                                          else self._compile_size(from_unit, cohort))
        return cohort

    def _size(self, prepared: placement.Prepared, runs: int, epochs: int) -> int:
        p = prepared.placement
        size = placement.balanced_size(runs, p.cohort_size, prepared.engine.mesh.shape["runs"])
        if placement.padding_worth_cutting(runs, p.cohort_size, size, epochs,
                                           placement.on_cpu(self.mesh)):
            return size
        return p.cohort_size

    def _compile_size(self, from_unit: str, cohort: cohort_lib.Cohort) -> dict:
        """A cohort size's steps (and norms, where a strategy measures) compiled."""
        prepared = self.prepared[from_unit]
        norms = self.norms_compiler.submit(
            ahead.compile_norms, cohort, self.variables, groups.bn_modes(self.table, []),
            self.config.data.batch_size, self.shape, self.split_sizes(prepared)) \
            if self._measures(from_unit) else None
        memory = self.compile(cohort, self.split_sizes(prepared),
                              prepared.placement.eval_batch_multiple)
        if norms is not None:
            norms.result()
        return memory

    def _measures(self, from_unit: str) -> bool:
        """Whether a strategy that measures (Auto-RGN) trains in this engine."""
        return any(self.plan.engine_of(g) == from_unit for name in self.plan.strategies
                   if strategies.REGISTRY[name].measures
                   for g in self.plan.planned.get(name, []))

    @staticmethod
    def split_sizes(prepared: placement.Prepared) -> dict | None:
        return ({k: len(v) for k, v in prepared.splits.items()} if prepared.cache_on_device
                else None)

    def _decide(self, prepared: placement.Prepared) -> placement.Placement:
        """Process 0's placement of an engine's runs, from its compiled steps."""
        engine = prepared.engine

        def compile_for(size: int, multiple: int) -> dict:
            if (size, multiple) not in prepared.compiled:
                cohort = prepared.cohorts.setdefault(size, cohort_lib.Cohort(engine, size))
                prepared.compiled[size, multiple] = self.compile(
                    cohort, self.split_sizes(prepared), multiple)
            return prepared.compiled[size, multiple]

        cache = placement.device_split_bytes(engine, sum(map(len, prepared.splits.values())),
                                             self.shape) if prepared.cache_on_device else 0
        return placement.decide(engine, self.variables, compile_for, max(prepared.cohorts),
                                cache, prepared.caps)

    def release(self, from_unit: str) -> None:
        """Frees the inputs of an engine whose runs are all done (its prefix cache in device
        memory): the next engine's placement sees that memory free."""
        if from_unit in self.prepared:
            self.prepared[from_unit].splits = {}


def _announce_cut(unit: str, runs: int, size: int, placed: int, where: str = "") -> None:
    log.info("Runs from unit %s: %d in cohorts of %d, not %d (a padded run would cost about "
             "what a real one does here); compiling that size%s", unit, runs, size, placed, where)
