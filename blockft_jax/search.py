"""The block-wise search: every strategy's candidates, trained, persisted, ranked.

The runs (candidate, seed) of each engine train in cohorts (`cohort.fit`, the one training
loop); each finished run is appended to results.jsonl, the running cohort is checkpointed after
its epochs, and a rerun of the same command resumes where the last one stopped.

On several processes (a pod) every process trains, and process 0 decides: the rows of
results.jsonl live in memory, read once by process 0 and broadcast, and each new row is process
0's (`multihost`); only process 0 writes or deletes in the workdir.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from blockft_jax import data as data_lib
from blockft_jax import (groups, models, multihost, placement, pretrained, report, results,
                         scalars, streams, train, weights)
from blockft_jax import cohort as cohort_lib
from blockft_jax.checkpoint import Checkpoint, save_model
from blockft_jax.progress import CompileClock, Progress
from blockft_jax.groups import Group
from blockft_jax.plan import (ConfigError, build_module, candidates, check, make_plan,
                              validate)
from blockft_jax.results import rank
from blockft_jax.workdir import (Workdir, copy_tree_atomic, finished_keys, jsonable,
                                 write_atomic)

log = logging.getLogger(__name__)

__all__ = ["run", "Search", "ConfigError", "build_module", "candidates", "validate"]


@dataclasses.dataclass
class Search:
    config: object
    wd: Workdir
    clock: "CompileClock"

    def __post_init__(self):
        c = self.config
        self.dataset = data_lib.load_from_config(c)
        self.module = build_module(c, len(self.dataset.class_names))
        self.shape = (c.model.input_size, c.model.input_size, 3)
        self.table = models.layer_table(self.module, self.shape)
        self.plan = make_plan(c, self.table, self.module.unit_names()[0])
        self.variables = pretrained.load(c, self.module)
        self.mesh = train.data_mesh()  # every device; each engine lays them out (`layout`)
        self.steps_per_epoch = -(-len(self.dataset.train.labels) // c.data.batch_size)
        self.tx = train.make_optimizer(c.train, c.train.epochs * self.steps_per_epoch)
        self.engines: dict[str, placement.Prepared] = {}
        # One background thread compiles the engines' steps, one engine after another.
        self.compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
        self.depth = {r.name: i for i, r in enumerate(reversed(groups.backbone_layers(self.table)))}
        # The finished runs: read once, on process 0, and the same on every process.
        self.rows: list[dict] = multihost.broadcast_json(self.wd.results)
        self.predictions_dir = self.wd.path / results.PREDICTIONS_DIR
        self.progress = Progress(self.plan.runs, len(finished_keys(self.rows)),
                                 c.train.epochs, flops=lambda unit: self.engines[unit]
                                 .flops_per_run() if unit in self.engines else None)
        if self.wd.writer:
            results.write_labels(self.predictions_dir, self.dataset.validation.labels,
                                 self.dataset.test.labels if len(self.dataset.test) else None)
            if self.dataset.skipped:
                write_atomic(self.wd.path / "skipped_files.txt", "".join(
                    f"{path}\t{reason}\n" for path, reason in self.dataset.skipped))

    def add_result(self, row: dict) -> dict:
        """Records a finished run: process 0's row, on every process, and in results.jsonl."""
        row = multihost.broadcast_json(lambda: row)
        self.rows.append(row)
        self.wd.append_result(row)
        return row

    # -- engines: one train-step compilation each -----------------------------------------------
    def prepare(self, from_unit: str, runs: int) -> placement.Prepared:
        """The engine for a lowest trainable unit, its inputs, and its steps compiling in the
        background for the largest cohort worth having (`runs` of it to train)."""
        if from_unit in self.engines:
            return self.engines[from_unit]
        c = self.config
        augment = {"flip": c.data.augment_flip, "crop": c.data.augment_crop}
        first = from_unit == self.module.unit_names()[0]
        cached = c.train.prefix_cache and not any(augment.values()) and not first
        kept = placement.kept(self.wd.path, from_unit, self.mesh)
        at_once = min(runs, c.search.parallel) if c.search.parallel >= 1 else runs
        layout = kept.layout if kept else tuple(multihost.broadcast_json(lambda: placement.layout(
            self.mesh.devices.size, at_once, c.data.batch_size)))
        engine = train.Engine(self.module, self.tx, from_unit,
                              train.mesh(self.mesh.devices, runs=layout[0]), cached=cached,
                              augment=None if cached else augment, table=self.table,
                              prefix_chunk_bytes=train.default_prefix_chunk_bytes())
        splits = {"train": self.dataset.train, "validation": self.dataset.validation,
                  "test": self.dataset.test}
        images = sum(map(len, splits.values()))
        start = lambda: placement.first(engine, self.variables, c.search.parallel, runs,
                                        placement.device_split_bytes(engine, images, self.shape),
                                        kept)
        begun = multihost.broadcast_json(start)
        cohort = cohort_lib.Cohort(engine, begun["size"])
        sizes = {k: len(v) for k, v in splits.items()} if begun["cache_on_device"] else None
        log.info("Compiling the steps for runs from unit %s (%d at once; in the background)",
                 from_unit, cohort.size)
        compiling = self.compiler.submit(self.compile, cohort, sizes, begun["multiple"])
        prepared = placement.Prepared(engine, splits, runs, {cohort.size: cohort}, {}, compiling,
                            begun["cache_on_device"], begun["caps"], kept)
        if cached:
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
        self.engines[from_unit] = prepared
        return prepared

    def compile(self, cohort: cohort_lib.Cohort, device_split_sizes, multiple: int) -> dict:
        """A cohort's steps compiled ahead (any candidate's mask: only structure matters):
        their memory by XLA's plan, and the train step's flops per run."""
        c = self.config
        any_mask = groups.param_mask(self.variables["params"], self.table, [])
        any_bn = groups.bn_modes(self.table, [], freeze_bn=c.train.freeze_bn)
        return cohort.compile_steps(self.variables, any_mask, any_bn, c.data.batch_size,
                                    self.shape, device_split_sizes, multiple)

    def ready(self, from_unit: str) -> placement.Prepared:
        """The engine with its placement decided (process 0, from its compiled steps) and its
        cohort's steps compiled."""
        prepared = self.engines[from_unit]
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
                    prepared.cohort, self._split_sizes(prepared), p.eval_batch_multiple)
        if not prepared.announced:
            log.info(placement.describe(from_unit, p, prepared.runs))
            prepared.announced = True
        return prepared

    def _split_sizes(self, prepared: placement.Prepared) -> dict | None:
        return ({k: len(v) for k, v in prepared.splits.items()} if prepared.cache_on_device
                else None)

    def _decide(self, prepared: placement.Prepared) -> placement.Placement:
        """Process 0's placement of an engine's runs, from its compiled steps."""
        engine = prepared.engine

        def compile_for(size: int, multiple: int) -> dict:
            if (size, multiple) not in prepared.compiled:
                cohort = prepared.cohorts.setdefault(size, cohort_lib.Cohort(engine, size))
                prepared.compiled[size, multiple] = self.compile(
                    cohort, self._split_sizes(prepared), multiple)
            return prepared.compiled[size, multiple]

        cache = placement.device_split_bytes(engine, sum(map(len, prepared.splits.values())),
                                             self.shape) if prepared.cache_on_device else 0
        return placement.decide(engine, self.variables, compile_for, max(prepared.cohorts),
                                cache, prepared.caps)

    def release(self, from_unit: str) -> None:
        """Frees the inputs of an engine whose runs are all done (its prefix cache in device
        memory): the next engine's placement sees that memory free."""
        if from_unit in self.engines:
            self.engines[from_unit].splits = {}

    def candidate_inputs(self, group: Group):
        """A candidate's parameter mask and BN modes."""
        return (groups.param_mask(self.variables["params"], self.table, group.layers),
                groups.bn_modes(self.table, group.layers, freeze_bn=self.config.train.freeze_bn))

    def scalar_writer(self, group: Group, seed: int):
        return (scalars.ScalarWriter(self.wd.path / "tensorboard" /
                                     f"{results.slug(group.candidate)}-seed{seed}")
                if self.wd.writer else None)

    def checkpoint_due(self):
        """A clock: true after an epoch once train.checkpoint_seconds have passed."""
        last = [time.perf_counter()]

        def due() -> bool:
            if time.perf_counter() - last[0] < self.config.train.checkpoint_seconds:
                return False
            last[0] = time.perf_counter()
            return True
        return due

    # -- a cohort of runs ----------------------------------------------------------------------
    def run_cohort(self, runs: list[tuple[Group, int]], from_unit: str):
        """Trains (candidate, seed) runs together as one cohort, resuming those its checkpoint
        holds; returns ([(results row, cohort.FitResult)], its Checkpoint)."""
        c = self.config
        prepared = self.engines[from_unit]
        cohort, splits = prepared.cohort, prepared.splits
        keys = [(g.candidate, seed) for g, seed in runs]
        ckpt = Checkpoint(self.wd.path / "checkpoints" / "current", keys, cohort)
        resumes = ckpt.restore(self.variables)
        members = [cohort_lib.Run(*self.candidate_inputs(g), seed,
                                  variables=self.start_variables(seed),
                                  resume=resumes.get((g.candidate, seed)))
                   for g, seed in runs]
        writers = [self.scalar_writer(g, seed) for g, seed in runs]
        due = self.checkpoint_due()
        last = [time.perf_counter()]

        def on_epoch_end(epoch, state, histories):
            now = time.perf_counter()
            trained = 0
            for writer, history in zip(writers, histories):
                if history and history[-1]["epoch"] == epoch:
                    _write_scalars(writer, history[-1], epoch)
                    trained += 1
            self.progress.epoch(from_unit, keys, histories, epoch, now - last[0], trained)
            if due():
                ckpt.save(state, histories, epoch)
            last[0] = time.perf_counter()

        try:
            fitted = cohort_lib.fit(
                cohort, self.variables, members, splits["train"], splits["validation"],
                splits["test"], epochs=c.train.epochs, batch_size=c.data.batch_size,
                eval_batch_multiple=prepared.placement.eval_batch_multiple,
                on_epoch_end=on_epoch_end)
        finally:
            for writer in writers:
                if writer is not None:
                    writer.close()
        return [(self.row(g, seed, result), result)
                for (g, seed), result in zip(runs, fitted)], ckpt

    def row(self, group: Group, seed: int, result: cohort_lib.FitResult) -> dict:
        """The results.jsonl row of a finished run."""
        return {"strategy": group.strategy, "candidate": group.candidate,
                "layers": list(group.layers), "depth": self._depth(group), "seed": seed,
                "epochs": result.epochs, "best_epoch": result.best_epoch,
                "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
                "final_val_accuracy": result.final_val_accuracy, "val_loss": result.val_loss,
                "train_seconds": round(result.train_seconds, 3), "steps": result.steps,
                "status": result.status}

    def start_variables(self, seed: int) -> dict:
        """The pretrained backbone with a head drawn from `seed`: seeds differ in their head
        as in their data order and dropout, and every candidate of one seed starts from the
        same head, so comparisons between candidates stay paired."""
        head = models.init_head(self.module, self.shape, streams.head_key(seed))
        return {**self.variables, "params": {**self.variables["params"], models.HEAD_UNIT: head}}

    def _depth(self, group: Group) -> int:
        """How far below the output the group reaches (0 = the top layer; -1 = head only)."""
        return max((self.depth[name] for name in group.layers), default=-1)


def run(config, workdir, *, start_over: bool = False) -> dict:
    """Runs (or resumes) the search that `config` describes in `workdir`; returns the summary."""
    check(config)  # every value and input, before the workdir is touched
    wd = Workdir(workdir)
    wd.lock()
    try:
        wd.claim(jsonable(config), start_over)
        summary = _run(config, wd)
    finally:
        wd.unlock()
    winner, best = summary["winner"], summary.get("best_model")
    log.info("Done. Winner: %s (validation %.3f); its model: %s; report: %s",
             winner["candidate"], winner["val_accuracy"]["mean"],
             _shown(wd.path / best) if best else "not saved", _shown(wd.path / "report.md"))
    return summary


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the current directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _run(config, wd: Workdir) -> dict:
    started = time.perf_counter()
    with CompileClock() as clock:
        summary, counts, training = _search(config, wd, clock)
    total = time.perf_counter() - started
    log.info("Compilation: %.1f s in all; %.1f s of it held up this run's %.1f s (%.1f%%), "
             "the rest ran alongside training", clock.seconds, clock.blocking, total,
             100 * clock.blocking / max(total, 1e-9))
    if wd.writer:  # what this process did; summary.json holds only what any run would give
        _append_jsonl(wd.path / "runs.jsonl", {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(total, 1),
            "compile_seconds": round(clock.seconds, 1),
            "compile_blocking_seconds": round(clock.blocking, 1), "compilations": counts,
            "training_seconds": round(training, 1)})
    return summary


def _search(config, wd: Workdir, clock: CompileClock) -> tuple[dict, dict, float]:
    search = Search(config, wd, clock)
    plan = search.plan
    done = finished_keys(search.rows)
    log.info("Searching %s: %d candidate runs (%d done), strategies %s, trainable from unit %s",
             config.model.name, plan.runs, len(done), ", ".join(plan.strategies), plan.top_unit)

    # Prepare the engines up front: each compiles its steps in the background, `full`'s while
    # the other candidates train.
    seeds = range(config.train.seeds)
    left = lambda names: sum((name, seed) not in done for name in names for seed in seeds)
    top_left = left([g.candidate for g in plan.shared] + plan.topk_names)
    full_left = left([g.candidate for g in plan.planned.get("full", [])])
    for unit, count in ((plan.top_unit, top_left), (plan.first_unit, full_left)):
        if unit is not None and count:
            search.progress.plan(unit, count)
            search.prepare(unit, count)
    # Runs in plan order, each engine's together, in cohorts; topk after layerwise's runs (it
    # needs their ranking), full's last.
    runs = lambda strategies: [(g, seed) for s in strategies for g in plan.planned[s]
                               for seed in seeds]
    top = [s for s in plan.strategies if s not in ("topk", "full")]
    training = 0.0  # seconds in the runs' training (fits), for runs.jsonl
    if top:
        training += _train_runs(search, runs(top), plan.top_unit)
    if "topk" in plan.strategies:  # the k best of layerwise's ranking, the same on every process
        ranking = [c["layers"][0] for c in rank([r for r in search.rows
                                                 if r["strategy"] == "layerwise"])]
        plan.planned["topk"] = candidates(config, search.table, "topk", ranking)
        training += _train_runs(search, runs(["topk"]), plan.top_unit)
    if plan.top_unit != plan.first_unit:
        search.release(plan.top_unit)
    if "full" in plan.strategies:
        training += _train_runs(search, runs(["full"]), plan.first_unit)

    # This process's compilations per engine (the plan's count, one train step per engine, is
    # in summary.json); more than one means a cohort size was compiled and then changed.
    counts = {unit: p.compilations() for unit, p in search.engines.items()}
    for unit, count in counts.items():
        if count["train"] > 1:
            log.warning("The train step from unit %s compiled %d times", unit, count["train"])
    log.info("Compilations in this run: %s", counts)
    search.compiler.shutdown(cancel_futures=True)
    summary = multihost.broadcast_json(lambda: _summarize(search))
    summary["best_model"] = _save_best(search, summary["winner"])
    wd.write_json("summary.json", summary)
    if wd.writer:
        report.write(wd.path)
    return summary, counts, training


BEST_MODEL = "models/best"


def _save_best(search: Search, winner: dict) -> str | None:
    """models/best: a copy, file for file, of the winner's saved model (models/<its
    strategy>/), so the search's answer is one path away; its path in the workdir, or None when
    that model is missing. Process 0 copies (plain files: no collective save)."""
    source = search.wd.path / "models" / winner["strategy"] / "model.json"
    if not multihost.broadcast_json(lambda: source.exists() and json.loads(
            source.read_text())["candidate"] == winner["candidate"]):
        log.warning("The winner's model (%s) is not in %s: no %s", winner["candidate"],
                    source.parent, BEST_MODEL)
        return None
    if search.wd.writer:
        copy_tree_atomic(source.parent, search.wd.path / BEST_MODEL)
    return BEST_MODEL


def _summarize(search: Search) -> dict:
    """The summary, with the paired comparisons its predictions allow (on process 0)."""
    args = (search.config, search.rows, len(search.plan.from_units))
    try:
        return results.summarize(*args, predictions_dir=search.predictions_dir)
    except results.StalePredictionsError as e:  # never lose the summary of a whole search
        log.warning("No paired comparisons: %s", e)
        return results.summarize(*args)


def _train_runs(search: Search, runs: list[tuple[Group, int]], from_unit: str) -> float:
    """Trains the (candidate, seed) runs of one engine that are not finished, in order, in
    cohorts of the engine's size (the last one padded). A candidate whose seeds are all
    finished may become its strategy's saved model (models/<strategy>/). Returns the seconds
    spent training (the fits, compilation they waited for included)."""
    todo = [(g, seed) for g, seed in runs if (g.candidate, seed) not in finished_keys(search.rows)]
    training = 0.0
    if todo:
        search.progress.plan(from_unit, len(todo))
        search.prepare(from_unit, len(todo))
        size = search.ready(from_unit).placement.cohort_size
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            started = time.perf_counter()
            finished, ckpt = search.run_cohort(chunk, from_unit)
            training += time.perf_counter() - started
            for (group, seed), (row, result) in zip(chunk, finished):
                _record(search, group, seed, row, result, from_unit)
            ckpt.clear()
            for group in dict.fromkeys(g for g, _ in chunk):
                _promote(search, group)
    for group in dict.fromkeys(g for g, _ in runs):  # after an interruption between the two
        _promote(search, group)
    return training


def _record(search: Search, group: Group, seed: int, row: dict,
            result: cohort_lib.FitResult, from_unit: str) -> None:
    """A finished run: its best variables (pending/) and predictions, then its row."""
    wd = search.wd
    if wd.writer:  # before the row: a row always has its model and predictions
        if result.best_variables is not None:
            weights.save_variables(_pending(wd, group.candidate, seed), result.best_variables)
        predictions = result.predictions or {
            "validation": np.full(len(search.dataset.validation), -1), "test": None}
        results.write_predictions(search.predictions_dir, group.candidate, seed,
                                  predictions["validation"], predictions["test"])
    search.progress.finished(search.add_result(row), from_unit)


def _pending(wd: Workdir, candidate: str, seed: int) -> Path:
    """Where a finished run's best variables wait: until its candidate's seeds are all done,
    and then, for the leading candidate's best seed, until its strategy is finished."""
    return wd.path / "pending" / f"{results.slug(candidate)}-seed{seed}.msgpack"


def _promote(search: Search, group: Group) -> None:
    """Once all seeds of `group` are finished: of its strategy's finished candidates, the leader
    keeps its best seed's variables in pending/ and the others' are deleted; once every
    candidate of the strategy is finished, the leader is saved as models/<strategy>/ (one save
    per strategy). Decided from the rows every process shares; process 0 reads the variables it
    wrote and sends them to all (orbax saves collectively); only process 0 deletes."""
    wd, seeds = search.wd, search.config.train.seeds
    by_candidate: dict[str, list[dict]] = {}
    for r in search.rows:
        if r["strategy"] == group.strategy:
            by_candidate.setdefault(r["candidate"], []).append(r)
    finished = {c: rs for c, rs in by_candidate.items() if len(rs) >= seeds}
    if group.candidate not in finished:
        return
    leader = rank([r for rs in finished.values() for r in rs])[0]["candidate"]
    best_seed = max(finished[leader], key=lambda r: r["val_accuracy"])["seed"]
    if wd.writer:
        for candidate in finished:
            for seed in range(seeds):
                if (candidate, seed) != (leader, best_seed):
                    _pending(wd, candidate, seed).unlink(missing_ok=True)
    planned = search.plan.planned[group.strategy]
    if not {g.candidate for g in planned} <= set(finished):
        return
    source = _pending(wd, leader, best_seed)
    # Absent when an earlier run saved this model and then stopped before removing pending/.
    if multihost.broadcast_json(source.exists):
        variables = multihost.broadcast_arrays(lambda: weights.load_variables(source),
                                               like=search.variables)
        winner = next(g for g in planned if g.candidate == leader)
        save_model(wd.path / "models" / group.strategy, variables,
                   model_meta(search, winner, best_seed))
        if wd.writer:
            source.unlink(missing_ok=True)


def _write_scalars(writer, record: dict, epoch: int) -> None:
    if writer is not None:
        writer.scalars({k: v for k, v in record.items()
                        if isinstance(v, (int, float)) and k != "epoch"}, epoch)


def model_meta(search: Search, group: Group, seed: int) -> dict:
    """model.json: everything needed to rebuild and use a saved model without the config."""
    model = jsonable(search.config)["model"]
    return {"strategy": group.strategy, "candidate": group.candidate,
            "layers": list(group.layers), "seed": seed, "model": model,
            "input_size": model["input_size"],
            "preprocessing": type(search.module).preprocessing,
            "class_names": list(search.dataset.class_names),
            "dataset": search.config.data.name}


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
