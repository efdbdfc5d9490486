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
import shutil
import threading
import time
from pathlib import Path

import jax
import numpy as np

from blockft_jax import data as data_lib
from blockft_jax import groups, models, multihost, pretrained, report, results, scalars, train, weights
from blockft_jax.checkpoint import Checkpoint, save_model
from blockft_jax.groups import Group
from blockft_jax.plan import ConfigError, build_module, candidates, make_plan, validate
from blockft_jax.results import rank
from blockft_jax.workdir import Workdir, finished_keys, jsonable, write_atomic

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
            # Compiles while the prefix features are computed and, for `full`'s engine
            # (created at the start of the search), while the other candidates train.
            any_mask = groups.param_mask(self.variables["params"], self.table, [])
            any_bn = groups.bn_modes(self.table, [], freeze_bn=c.train.freeze_bn)
            self.compiling[from_unit] = self.compiler.submit(
                engine.compile_steps, self.variables, any_mask, any_bn, c.data.batch_size,
                self.shape, {k: len(v) for k, v in splits.items()} if on_device else None)
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

    # -- one candidate -------------------------------------------------------------------------
    def run_candidate(self, group: Group, seed: int, from_unit: str):
        """Trains one (candidate, seed), resuming its checkpoint if there is one; returns
        (results row, its train.FitResult, its Checkpoint)."""
        c = self.config
        engine, splits = self.engine_for(from_unit)
        if from_unit in self.compiling:
            with self.clock.waiting():
                self.compiling.pop(from_unit).result()
        mask = groups.param_mask(self.variables["params"], self.table, group.layers)
        bn = groups.bn_modes(self.table, group.layers, freeze_bn=c.train.freeze_bn)
        ckpt = Checkpoint(self.wd.path / "checkpoints" / "current", group.candidate, seed)
        start = self.start_variables(seed)
        fresh = engine.init_state(start)
        resume = ckpt.restore(fresh) or {"state": fresh}
        writer = (scalars.ScalarWriter(self.wd.path / "tensorboard" /
                                       f"{results.slug(group.candidate)}-seed{seed}")
                  if self.wd.writer else None)

        last_save = [time.perf_counter()]

        def on_epoch_end(epoch, state, history, best_variables):
            if writer is not None:
                writer.scalars({k: v for k, v in history[-1].items()
                                if isinstance(v, (int, float)) and k != "epoch"}, epoch)
            if time.perf_counter() - last_save[0] >= c.train.checkpoint_seconds:
                ckpt.save(state, history, epoch, best_variables)
                last_save[0] = time.perf_counter()

        try:
            result = train.fit(engine, start, mask, bn, splits["train"],
                               splits["validation"], splits["test"], epochs=c.train.epochs,
                               batch_size=c.data.batch_size, seed=seed,
                               on_epoch_end=on_epoch_end, **resume)
        finally:
            if writer is not None:
                writer.close()
        return {"strategy": group.strategy, "candidate": group.candidate,
                "layers": list(group.layers), "depth": self._depth(group), "seed": seed,
                "epochs": result.epochs, "best_epoch": result.best_epoch,
                "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
                "final_val_accuracy": result.final_val_accuracy, "val_loss": result.val_loss,
                "train_seconds": round(result.train_seconds, 3), "steps": result.steps,
                "status": result.status}, result, ckpt

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
    validate(config)
    wd = Workdir(workdir)
    wd.lock()
    try:
        wd.claim(jsonable(config), start_over)
        return _run(config, wd)
    finally:
        wd.unlock()


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
        summary, counts = _search(config, wd, clock)
    total = time.perf_counter() - started
    log.info("Compilation: %.1f s in all; %.1f s of it held up this run's %.1f s (%.1f%%), "
             "the rest ran alongside training", clock.seconds, clock.blocking, total,
             100 * clock.blocking / max(total, 1e-9))
    if wd.writer:  # what this process did; summary.json holds only what any run would give
        _append_jsonl(wd.path / "runs.jsonl", {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(total, 1),
            "compile_seconds": round(clock.seconds, 1),
            "compile_blocking_seconds": round(clock.blocking, 1), "compilations": counts})
    return summary


def _search(config, wd: Workdir, clock: CompileClock) -> tuple[dict, dict]:
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
    for strategy in plan.strategies:
        if strategy == "topk":  # the k best of layerwise's ranking, the same on every process
            ranking = [c["layers"][0] for c in rank([r for r in search.rows
                                                     if r["strategy"] == "layerwise"])]
            plan.planned["topk"] = candidates(config, search.table, "topk", ranking)
        for group in plan.planned[strategy]:
            _run_seeds(search, group, plan.from_unit(strategy), progress)

    # Distinct train steps the plan compiles (one per lowest trainable unit): a fact of the
    # plan, so a resumed search reports the same. This process's real counts go to runs.jsonl.
    counts = {u: e.compilations for u, (e, _) in search.engines.items()}
    for unit, count in counts.items():
        if count["train"] > 1:
            log.warning("The train step from unit %s compiled %d times", unit, count["train"])
    log.info("Compilations in this run: %s", counts)
    search.compiler.shutdown(cancel_futures=True)
    summary = multihost.broadcast_json(lambda: _summarize(search))
    wd.write_json("summary.json", summary)
    if wd.writer:
        report.write(wd.path)
    log.info("Done. Winner: %s (validation %.3f); report: %s", summary["winner"]["candidate"],
             summary["winner"]["val_accuracy"]["mean"], wd.path / "report.md")
    return summary, counts


def _summarize(search: Search) -> dict:
    """The summary, with the paired comparisons its predictions allow (on process 0)."""
    args = (search.config, search.rows, len(search.plan.from_units))
    try:
        return results.summarize(*args, predictions_dir=search.predictions_dir)
    except results.StalePredictionsError as e:  # never lose the summary of a whole search
        log.warning("No paired comparisons: %s", e)
        return results.summarize(*args)


def _run_seeds(search: Search, group: Group, from_unit: str, progress: "Progress") -> None:
    """All seeds of one candidate; then, if it is its strategy's best so far, its variables
    (best seed, best epoch) become models/<strategy>/."""
    wd, config = search.wd, search.config
    for seed in range(config.train.seeds):
        if (group.candidate, seed) in finished_keys(search.rows):
            continue
        row, result, ckpt = search.run_candidate(group, seed, from_unit)
        if wd.writer:  # before the row: a row always has its model and predictions
            if result.best_variables is not None:
                weights.save_variables(wd.path / "pending" / f"seed{seed}.msgpack",
                                       result.best_variables)
            predictions = result.predictions or {
                "validation": np.full(len(search.dataset.validation), -1), "test": None}
            results.write_predictions(search.predictions_dir, group.candidate, seed,
                                      predictions["validation"], predictions["test"])
        row = search.add_result(row)
        ckpt.clear()
        progress.finished(row)
    _promote(search, group)


def _promote(search: Search, group: Group) -> None:
    """Saves the candidate as models/<strategy>/ when it leads its strategy. Decided from the
    rows every process shares; process 0 reads the variables it wrote and sends them to all
    (orbax saves collectively); only process 0 deletes."""
    wd = search.wd
    pending = wd.path / "pending"
    rows = [r for r in search.rows if r["strategy"] == group.strategy]
    ranking = rank(rows)
    if ranking and ranking[0]["candidate"] == group.candidate:
        mine = [r for r in rows if r["candidate"] == group.candidate]
        best_seed = max(mine, key=lambda r: r["val_accuracy"])["seed"]
        source = pending / f"seed{best_seed}.msgpack"
        # Absent when an earlier run saved this model and then stopped before removing pending/.
        if multihost.broadcast_json(source.exists):
            variables = multihost.broadcast_arrays(lambda: weights.load_variables(source),
                                                   like=search.variables)
            save_model(wd.path / "models" / group.strategy, variables,
                       model_meta(search, group, best_seed))
    if wd.writer:
        shutil.rmtree(pending, ignore_errors=True)


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
