"""The block-wise search: every strategy's candidates, trained, persisted, ranked.

Candidates are trained one after another with the same compiled step; each finished
(candidate, seed) is appended to results.jsonl, the running one is checkpointed after its epochs,
and a rerun of the same command resumes where the last one stopped.

On several processes (a pod) every process trains, and process 0 decides: the rows of
results.jsonl live in memory, read once by process 0 and broadcast, and each new row is process
0's (`multihost`); only process 0 writes or deletes in the workdir.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
from pathlib import Path

import jax
import numpy as np

from blockft_jax import data as data_lib
from blockft_jax import (groups, models, multihost, pretrained, report, results, scalars, train,
                         weights)
from blockft_jax import cohort as cohort_lib
from blockft_jax.checkpoint import Checkpoint, CohortCheckpoint, save_model
from blockft_jax.groups import Group
from blockft_jax.plan import (ConfigError, build_module, candidates, check, make_plan,
                              validate)
from blockft_jax.results import rank
from blockft_jax.workdir import (Workdir, copy_tree_atomic, finished_keys, jsonable,
                                 write_atomic)

log = logging.getLogger(__name__)

# fold_in(key(seed), this) draws a run's head; key(seed) itself drives its dropout (train.fit).
HEAD_INIT_STREAM = 1

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
        self.mesh = train.data_mesh()
        self.steps_per_epoch = -(-len(self.dataset.train.labels) // c.data.batch_size)
        self.tx = train.make_optimizer(c.train, c.train.epochs * self.steps_per_epoch)
        self.engines: dict[str, tuple[train.Engine, dict]] = {}
        self.cohorts: dict[str, cohort_lib.Cohort | None] = {}  # None: one run at a time
        # One background thread compiles the engines' steps, one engine after another.
        self.compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
        self.compiling: dict = {}  # from_unit -> future of that engine's compilation
        self.depth = {r.name: i for i, r in enumerate(reversed(groups.backbone_layers(self.table)))}
        # The finished runs: read once, on process 0, and the same on every process.
        self.rows: list[dict] = multihost.broadcast_json(self.wd.results)
        self.predictions_dir = self.wd.path / results.PREDICTIONS_DIR
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

    # -- engines: at most two train-step compilations per search -------------------------------
    def engine_for(self, from_unit: str):
        """The engine (and its train/validation/test inputs) for a lowest trainable unit."""
        if from_unit not in self.engines:
            c = self.config
            augment = {"flip": c.data.augment_flip, "crop": c.data.augment_crop}
            first = from_unit == self.module.unit_names()[0]
            cached = c.train.prefix_cache and not any(augment.values()) and not first
            engine = train.Engine(self.module, self.tx, from_unit, self.mesh, cached=cached,
                                  augment=None if cached else augment, table=self.table,
                                  prefix_chunk_bytes=train.default_prefix_chunk_bytes())
            splits = {"train": self.dataset.train, "validation": self.dataset.validation,
                      "test": self.dataset.test}
            # The cache lives in device memory when it fits: the steps gather their batches.
            on_device = engine.cache_fits_on_device(sum(map(len, splits.values())))
            size = self.cohort_size(engine, on_device and engine.feature_bytes(
                sum(map(len, splits.values()))))
            self.cohorts[from_unit] = cohort_lib.Cohort(engine, size) if size > 1 else None
            # Compiles while the prefix features are computed and, for `full`'s engine
            # (created at the start of the search), while the other candidates train.
            any_mask = groups.param_mask(self.variables["params"], self.table, [])
            any_bn = groups.bn_modes(self.table, [], freeze_bn=c.train.freeze_bn)
            self.compiling[from_unit] = self.compiler.submit(
                (self.cohorts[from_unit] or engine).compile_steps, self.variables, any_mask,
                any_bn, c.data.batch_size, self.shape,
                {k: len(v) for k, v in splits.items()} if on_device else None)
            if cached:
                started = time.perf_counter()
                splits = {k: engine.features(self.variables, v, c.data.batch_size)
                          for k, v in splits.items()}
                nbytes = sum(s.images.nbytes for s in splits.values())
                if on_device:
                    splits = {k: engine.to_device(v) for k, v in splits.items()}
                log.info("Prefix cache: units below %s computed once per image (%.1f MB in "
                         "%s memory, %.1f s)", from_unit, nbytes / 2**20,
                         "device" if on_device else "host", time.perf_counter() - started)
            self.engines[from_unit] = (engine, splits)
        return self.engines[from_unit]

    def cohort_size(self, engine: train.Engine, cache_bytes: int) -> int:
        """How many runs of `engine` train at once (`search.parallel`; 0: as memory allows,
        cohort.cohort_size's rule). Decided once per search and kept in cohorts.json, so a
        resumed search forms the same cohorts (and compiles the same programs)."""
        c = self.config
        plan = self.plan
        runs = c.train.seeds * sum(len(plan.topk_names) if s == "topk" else len(plan.planned[s])
                                   for s in plan.strategies
                                   if plan.from_unit(s) == engine.from_unit)

        def decide() -> int:
            path = self.wd.path / "cohorts.json"
            kept = json.loads(path.read_text()) if path.exists() else {}
            if engine.from_unit not in kept:
                kept[engine.from_unit] = cohort_lib.cohort_size(
                    engine, self.variables, c.search.parallel, runs,
                    batch_size=c.data.batch_size, cache_bytes=int(cache_bytes or 0))
                write_atomic(path, json.dumps(kept, indent=2))
            return kept[engine.from_unit]

        size = multihost.broadcast_json(decide)
        log.info("Runs from unit %s: %d, trained %s", engine.from_unit, runs,
                 "one at a time" if size == 1 else f"in cohorts of {size}")
        return size

    def ready(self, from_unit: str):
        """The engine, its inputs and its cohort (None: one run at a time), compiled."""
        engine, splits = self.engine_for(from_unit)
        if from_unit in self.compiling:
            with self.clock.waiting():
                self.compiling.pop(from_unit).result()
        return engine, splits, self.cohorts[from_unit]

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

    # -- one candidate -------------------------------------------------------------------------
    def run_candidate(self, group: Group, seed: int, from_unit: str):
        """Trains one (candidate, seed), resuming its checkpoint if there is one; returns
        (results row, its train.FitResult, its Checkpoint)."""
        c = self.config
        engine, splits, _ = self.ready(from_unit)
        mask, bn = self.candidate_inputs(group)
        ckpt = Checkpoint(self.wd.path / "checkpoints" / "current", group.candidate, seed)
        start = self.start_variables(seed)
        fresh = engine.init_state(start)
        resume = ckpt.restore(fresh) or {"state": fresh}
        writer = self.scalar_writer(group, seed)
        due = self.checkpoint_due()

        def on_epoch_end(epoch, state, history, best_variables):
            _write_scalars(writer, history[-1], epoch)
            if due():
                ckpt.save(state, history, epoch, best_variables)

        try:
            result = train.fit(engine, start, mask, bn, splits["train"],
                               splits["validation"], splits["test"], epochs=c.train.epochs,
                               batch_size=c.data.batch_size, seed=seed,
                               on_epoch_end=on_epoch_end, **resume)
        finally:
            if writer is not None:
                writer.close()
        return self.row(group, seed, result), result, ckpt

    # -- a cohort of candidates ----------------------------------------------------------------
    def run_cohort(self, runs: list[tuple[Group, int]], from_unit: str):
        """Trains (candidate, seed) runs together as one cohort, resuming its checkpoint if
        there is one; returns ([(results row, train.FitResult)], its CohortCheckpoint)."""
        c = self.config
        engine, splits, cohort = self.ready(from_unit)
        starts = [self.start_variables(seed) for _, seed in runs]
        ckpt = CohortCheckpoint(self.wd.path / "checkpoints" / "current",
                                [(g.candidate, seed) for g, seed in runs], cohort)
        resumes = ckpt.restore(lambda: cohort.init(self.variables, starts + [starts[0]] * (
            cohort.size - len(runs)))) or [None] * len(runs)
        members = [cohort_lib.Run(*self.candidate_inputs(g), seed, resume=resume,
                                  variables=start)
                   for (g, seed), resume, start in zip(runs, resumes, starts)]
        writers = [self.scalar_writer(g, seed) for g, seed in runs]
        due = self.checkpoint_due()

        def on_epoch_end(epoch, state, histories, best_variables):
            for writer, history in zip(writers, histories):
                if history and history[-1]["epoch"] == epoch:
                    _write_scalars(writer, history[-1], epoch)
            if due():
                ckpt.save(state, histories, epoch, best_variables)

        try:
            fitted = cohort_lib.fit_cohort(
                cohort, self.variables, members, splits["train"], splits["validation"],
                splits["test"], epochs=c.train.epochs, batch_size=c.data.batch_size,
                on_epoch_end=on_epoch_end)
        finally:
            for writer in writers:
                if writer is not None:
                    writer.close()
        return [(self.row(g, seed, result), result)
                for (g, seed), result in zip(runs, fitted)], ckpt

    def row(self, group: Group, seed: int, result: train.FitResult) -> dict:
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
        rng = jax.random.fold_in(jax.random.key(seed), HEAD_INIT_STREAM)
        head = models.init_head(self.module, self.shape, rng)
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


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling while it is installed: in all
    (`seconds`, background compilations included), and holding up the thread that installed it
    (`blocking`: compiling on that thread or waiting for a background compilation)."""

    def __init__(self):
        self.seconds = self.blocking = 0.0
        self.thread = threading.current_thread()

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration
            if threading.current_thread() is self.thread:
                self.blocking += duration

    @contextlib.contextmanager
    def waiting(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.blocking += time.perf_counter() - started

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


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
    progress = Progress(plan.runs, len(done))
    log.info("Searching %s: %d candidate runs (%d done), strategies %s, trainable from unit %s",
             config.model.name, plan.runs, len(done), ", ".join(plan.strategies), plan.top_unit)

    # Create the engines up front: each compiles its steps in the background, `full`'s while
    # the other candidates train.
    to_do = lambda names: any((name, seed) not in done for name in names
                              for seed in range(config.train.seeds))
    if plan.top_unit is not None and to_do([g.candidate for g in plan.shared] + plan.topk_names):
        search.engine_for(plan.top_unit)
    if "full" in plan.strategies and to_do([g.candidate for g in plan.planned["full"]]):
        search.engine_for(plan.first_unit)
    # Runs in plan order, each engine's together (trained one at a time or in cohorts); topk
    # after layerwise's runs (it needs their ranking), full's last.
    runs = lambda strategies: [(g, seed) for s in strategies for g in plan.planned[s]
                               for seed in range(config.train.seeds)]
    top = [s for s in plan.strategies if s not in ("topk", "full")]
    training = 0.0  # seconds in the runs' training (fits), for runs.jsonl
    if top:
        training += _train_runs(search, runs(top), plan.top_unit, progress)
    if "topk" in plan.strategies:  # the k best of layerwise's ranking, the same on every process
        ranking = [c["layers"][0] for c in rank([r for r in search.rows
                                                 if r["strategy"] == "layerwise"])]
        plan.planned["topk"] = candidates(config, search.table, "topk", ranking)
        training += _train_runs(search, runs(["topk"]), plan.top_unit, progress)
    if "full" in plan.strategies:
        training += _train_runs(search, runs(["full"]), plan.first_unit, progress)

    # Distinct train steps the plan compiles (one per lowest trainable unit): a fact of the
    # plan, so a resumed search reports the same. This process's real counts go to runs.jsonl.
    counts = {u: {**e.compilations, **(search.cohorts[u].compilations if search.cohorts[u]
                                       else {})} for u, (e, _) in search.engines.items()}
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


def _train_runs(search: Search, runs: list[tuple[Group, int]], from_unit: str,
                progress: "Progress") -> float:
    """Trains the (candidate, seed) runs of one engine that are not finished, in order: one at
    a time, or in cohorts of the engine's size (the last one padded). A candidate whose seeds
    are all finished may become its strategy's saved model (models/<strategy>/). Returns the
    seconds spent training (the fits, compilation they waited for included)."""
    todo = [(g, seed) for g, seed in runs if (g.candidate, seed) not in finished_keys(search.rows)]
    if todo:
        search.engine_for(from_unit)
    size = search.cohorts[from_unit].size if search.cohorts.get(from_unit) else 1
    training = 0.0
    for start in range(0, len(todo), size):
        chunk = todo[start:start + size]
        started = time.perf_counter()
        if size == 1:
            row, result, ckpt = search.run_candidate(*chunk[0], from_unit)
            finished = [(row, result)]
        else:
            finished, ckpt = search.run_cohort(chunk, from_unit)
        training += time.perf_counter() - started
        for (group, seed), (row, result) in zip(chunk, finished):
            _record(search, group, seed, row, result, progress)
        ckpt.clear()
        for group in dict.fromkeys(g for g, _ in chunk):
            _promote(search, group)
    for group in dict.fromkeys(g for g, _ in runs):  # after an interruption between the two
        _promote(search, group)
    return training


def _record(search: Search, group: Group, seed: int, row: dict, result: train.FitResult,
            progress: "Progress") -> None:
    """A finished run: its best variables (pending/) and predictions, then its row."""
    wd = search.wd
    if wd.writer:  # before the row: a row always has its model and predictions
        if result.best_variables is not None:
            weights.save_variables(_pending(wd, group.candidate, seed), result.best_variables)
        predictions = result.predictions or {
            "validation": np.full(len(search.dataset.validation), -1), "test": None}
        results.write_predictions(search.predictions_dir, group.candidate, seed,
                                  predictions["validation"], predictions["test"])
    progress.finished(search.add_result(row))


def _pending(wd: Workdir, candidate: str, seed: int) -> Path:
    """Where a finished run's best variables wait until its candidate's seeds are all done."""
    return wd.path / "pending" / f"{results.slug(candidate)}-seed{seed}.msgpack"


def _promote(search: Search, group: Group) -> None:
    """Once all its seeds are finished, saves the candidate as models/<strategy>/ when it leads
    its strategy. Decided from the rows every process shares; process 0 reads the variables it
    wrote and sends them to all (orbax saves collectively); only process 0 deletes."""
    wd = search.wd
    rows = [r for r in search.rows if r["strategy"] == group.strategy]
    mine = [r for r in rows if r["candidate"] == group.candidate]
    if len(mine) < search.config.train.seeds:
        return
    ranking = rank(rows)
    if ranking[0]["candidate"] == group.candidate:
        best_seed = max(mine, key=lambda r: r["val_accuracy"])["seed"]
        source = _pending(wd, group.candidate, best_seed)
        # Absent when an earlier run saved this model and then stopped before removing pending/.
        if multihost.broadcast_json(source.exists):
            variables = multihost.broadcast_arrays(lambda: weights.load_variables(source),
                                                   like=search.variables)
            save_model(wd.path / "models" / group.strategy, variables,
                       model_meta(search, group, best_seed))
    if wd.writer:
        for seed in range(search.config.train.seeds):
            _pending(wd, group.candidate, seed).unlink(missing_ok=True)


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


class Progress:
    """Console progress with an ETA for the whole search."""

    def __init__(self, total: int, done: int):
        self.total, self.done, self.started, self.ran = total, done, time.perf_counter(), 0

    def finished(self, row: dict) -> None:
        self.done += 1
        self.ran += 1
        elapsed = time.perf_counter() - self.started
        left = (self.total - self.done) * elapsed / self.ran
        log.info("[%d/%d] %-40s seed %d: val %.3f test %s (epoch %d, %s) %.1fs | ETA %s",
                 self.done, self.total, row["candidate"], row["seed"], row["val_accuracy"],
                 "-" if row["test_accuracy"] is None else f"{row['test_accuracy']:.3f}",
                 row["best_epoch"], row["status"], row["train_seconds"], _duration(left))


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"
