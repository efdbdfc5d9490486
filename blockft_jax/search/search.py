"""The block-wise search: every strategy's candidates, trained, persisted, ranked.

The runs (candidate, seed) of each engine train in cohorts (`cohort.fit`, the one training
loop); each finished run is appended to results.jsonl, the running cohort is checkpointed after
its epochs, and a rerun of the same command resumes where the last one stopped.

On several processes (a pod) every process trains, and process 0 decides: the rows of
results.jsonl live in memory, read once by process 0 and broadcast, and each new row is process
0's (`multihost`); only process 0 writes or deletes in the workdir.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np

from blockft_jax import models
from blockft_jax.candidates import groups, halving, settings, strategies, subtuning
from blockft_jax.candidates.groups import Group
from blockft_jax.common import durable, multihost, scalars, streams
from blockft_jax.common.durable import write_atomic
from blockft_jax.common.progress import CompileClock, Progress
from blockft_jax.common.workdir import ENGINES, TENSORBOARD, Workdir, jsonable
from blockft_jax.engine import checkpoint, train
from blockft_jax.engine import cohort as cohort_lib
from blockft_jax.engine.checkpoint import Checkpoint, save_model
from blockft_jax.inputs import data as data_lib
from blockft_jax.inputs import weights
from blockft_jax.search import costs, pretrained, report, results
from blockft_jax.search.decisions import Decisions, round_pool
from blockft_jax.search.engines import Engines
from blockft_jax.search.ledger import Ledger
from blockft_jax.search.plan import (build_module, candidates, check, engine_work,
                                     make_plan, round_rung)
from blockft_jax.search.results import rank

log = logging.getLogger(__name__)

__all__ = ["run", "Search"]


@dataclasses.dataclass
class Search:
    """One search's inputs (data, model, pretrained variables, plan) and its parts: the
    engines (`engines.Engines`), what is known of each run (`ledger.Ledger`) and the halving
    schedule's decisions (`decisions.Decisions`); it trains a cohort of runs (`run_cohort`)."""
    config: object
    wd: Workdir
    clock: "CompileClock"

    def __post_init__(self):
        c = self.config
        self.dataset = data_lib.load_from_config(c)
        self.module = build_module(c, len(self.dataset.class_names))
        self.shape = (c.model.input_size, c.model.input_size, 3)
        self.table = models.layer_table(self.module, self.shape)
        self.variables = pretrained.load(c, self.module)
        self.mesh = train.data_mesh()  # every device; each engine lays them out (`layout`)
        self.tx = train.make_optimizer(c.train, train.total_steps(c, len(self.dataset.train)))
        self._measured = None
        self.plan = self._plan()
        self.engines = Engines(c, self.module, self.tx, self.table, self.mesh, self.plan,
                               self.variables, self.dataset, self.wd, self.clock, self.speed)
        self.depth = {r.name: i for i, r in enumerate(reversed(groups.backbone_layers(self.table)))}
        self.ledger = Ledger(self.wd, len(self.dataset.validation))
        self.progress = Progress(self.plan.runs, len(self.ledger.finished()),
                                 flops=lambda unit: self.engines[unit].flops_per_run()
                                 if unit in self.engines else None)
        self.decisions = Decisions(c, self.plan, self.ledger, self.progress, self.wd,
                                   len(self.dataset.class_names), self.dataset.validation.labels)
        if self.wd.writer:
            results.write_labels(self.ledger.predictions_dir, self.dataset.validation.labels,
                                 self.dataset.test.labels if len(self.dataset.test) else None)
            if self.dataset.skipped:
                write_atomic(self.wd.path / "skipped_files.txt", "".join(
                    f"{path}\t{reason}\n" for path, reason in self.dataset.skipped))

    def _plan(self):
        """The plan, with the candidates but the whole network's split into engines by depth
        from this machine's speed (real train steps compiled and timed) when there is a choice.
        The split is kept in engines.json: a rerun trains each run in the engine it began in."""
        c = self.config
        train_images = len(self.dataset.train)
        plan = make_plan(c, self.table, self.module, train_images=train_images)
        lowest = sorted({plan.lowest_unit(g) for g in plan.shared}, key=plan.units.index)
        if c.search.engines == 1 or len(lowest) < 2:
            return plan
        path = self.wd.path / ENGINES
        kept = multihost.broadcast_json(
            lambda: json.loads(path.read_text()) if path.exists() else None)
        if kept is not None and plan.covers(kept["engines"]):
            plan.engines = kept["engines"]
            return plan
        speed = self.speed(plan)
        images = (len(self.dataset.train), len(self.dataset.validation))
        plan = make_plan(c, self.table, self.module, speed=speed, images=images,
                         train_images=train_images)
        self.wd.write_json(ENGINES, {"engines": plan.engines, "speed": speed.to_json()})
        log.info("Engines by depth: candidates but the whole network's train from units %s (at "
                 "most search.engines=%d; chosen for the least compile plus training time: %.1f s "
                 "to compile an engine, %.1f ms a step and %.2g s per GFLOP, measured on %s)",
                 ", ".join(plan.engines), c.search.engines, speed.compile_seconds,
                 speed.step_seconds * 1e3, speed.seconds_per_flop * 1e9, speed.measured_on)
        return plan

    def speed(self, plan=None) -> costs.Speed:
        """This machine's speed for this job (costs.measure_once: measured once per machine and
        kept), measured on first need: the engines' split, or a CPU's cohorts."""
        if self._measured is None:
            c = self.config
            self._measured = costs.Speed(**multihost.broadcast_json(lambda: costs.measure_once(
                c, plan or self.plan, self.module, self.table, self.variables, self.tx,
                batch_size=c.data.batch_size, image_shape=self.shape).to_json()))
        return self._measured

    def candidate_inputs(self, group: Group) -> groups.Inputs:
        """A candidate's mask and BN modes (and how they change between epochs), under its
        setting."""
        return settings.apply(strategies.inputs(self.variables["params"], self.table, group), group,
                              settings.head_factor(self.config))

    def scalar_writer(self, group: Group, seed: int):
        return (scalars.ScalarWriter(self.wd.path / TENSORBOARD /
                                     f"{results.slug(group.candidate)}-seed{seed}")
                if self.wd.writer else None)

    def checkpoint_due(self):
        """A clock: true after an epoch once train.checkpoint_seconds have passed, by process
        0's clock (a checkpoint is collective: processes whose clocks disagree near the
        boundary must not enter it apart)."""
        last = [time.perf_counter()]

        def decide() -> bool:
            if time.perf_counter() - last[0] < self.config.train.checkpoint_seconds:
                return False
            last[0] = time.perf_counter()
            return True
        return lambda: multihost.broadcast_json(decide)

    # -- a cohort of runs ----------------------------------------------------------------------
    def run_cohort(self, runs: list[tuple[Group, int]], from_unit: str, rung: int,
                   budget: halving.Rung | None = None, size: int | None = None):
        """Trains (candidate, seed) runs together as one cohort up to rung `rung`'s epochs
        (`budget`'s, when given: a round's), each from where it stopped (the cohort
        checkpoint, else its parked state, else its start); returns ([(results row,
        cohort.FitResult)], its Checkpoint). `size`: the cohort's (`Engines.cohort_for`; the
        placed size when None)."""
        c = self.config
        budget = budget or self.plan.rungs[rung]
        prepared = self.engines[from_unit]
        cohort = prepared.cohorts[size] if size else prepared.cohort
        splits = prepared.splits
        keys = [(g.candidate, seed) for g, seed in runs]
        ckpt = Checkpoint(self.wd.path / "checkpoints" / "current", keys, cohort)
        resumes = ckpt.restore(self.variables)
        stem = self.ledger.parked_stem
        for key in keys:
            if key not in resumes and multihost.broadcast_json(
                    lambda key=key: checkpoint.parked(stem(*key)) is not None):
                resumes[key] = checkpoint.unpark(stem(*key), self._one_run(cohort))
        members = []
        for g, seed in runs:
            inputs = self.candidate_inputs(g)
            members.append(cohort_lib.Run(inputs.mask, inputs.bn_modes, seed,
                                          variables=self.start_variables(seed),
                                          resume=resumes.get((g.candidate, seed)),
                                          mask_at=inputs.mask_at,
                                          norm_batches=inputs.norm_batches,
                                          penalty=inputs.penalty))
        if any(m.norm_batches for m in members) and prepared.norms is not None:
            with self.clock.waiting():  # Auto-RGN's measurement, compiled in the background
                prepared.norms.result()
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
                splits["test"], epochs=budget.epochs,
                batch_size=c.data.batch_size,
                eval_batch_multiple=prepared.placement.eval_batch_multiple,
                keep_state=not budget.final, on_epoch_end=on_epoch_end)
        finally:
            for writer in writers:
                if writer is not None:
                    writer.close()
        return [(self.row(g, seed, result, rung), result)
                for (g, seed), result in zip(runs, fitted)], ckpt

    def _one_run(self, cohort: cohort_lib.Cohort) -> dict:
        """Zeros shaped as one run's {'state', 'best'} (what a parked run restores into)."""
        one = jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype),
                           cohort.abstract_runs(self.variables))
        return {"state": one, "best": cohort_lib.live(one)}

    def row(self, group: Group, seed: int, result: cohort_lib.FitResult, rung: int) -> dict:
        """The results.jsonl row of a run as it stands at rung `rung` (the index of the rung
        it reached)."""
        return {"strategy": group.strategy, "candidate": group.candidate,
                "layers": list(group.layers), **settings.of_group(group),
                "depth": self._depth(group), "seed": seed,
                "epochs": result.epochs, "best_epoch": result.best_epoch,
                "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy,
                "final_val_accuracy": result.final_val_accuracy, "val_loss": result.val_loss,
                "train_seconds": round(result.train_seconds, 3), "steps": result.steps,
                "status": result.status, "rung": rung}

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
        durable.append_line(wd.path / "runs.jsonl", json.dumps({
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(total, 1),
            "compile_seconds": round(clock.seconds, 1),
            "compile_blocking_seconds": round(clock.blocking, 1), "compilations": counts,
            "training_seconds": round(training, 1)}))
    return summary


def _search(config, wd: Workdir, clock: CompileClock) -> tuple[dict, dict, float]:
    search = Search(config, wd, clock)
    plan = search.plan
    done = search.ledger.finished()
    log.info("Searching %s: %d candidate runs (%d done, %s schedule%s), strategies %s; engines "
             "from units %s", config.model.name, plan.runs, len(done), config.search.schedule,
             f", rungs of {[r.epochs for r in plan.rungs]} epochs" if len(plan.rungs) > 1
             else "", ", ".join(plan.strategies), ", ".join(sorted(
                 plan.from_units, key=plan.units.index, reverse=True)))
    # Prepare the engines up front, each compiling its steps in the background (shallowest
    # first: the first to train), the whole network's while the others train.
    work = engine_work(plan)
    for unit in sorted(work, key=plan.units.index, reverse=True):
        if any(key not in done for key in work[unit]["keys"]):
            search.progress.plan(unit, work[unit]["run_epochs"])
            search.engines.prepare(unit, work[unit]["runs"])
    training = 0.0  # seconds in the runs' training (fits), for runs.jsonl
    # Three phases: the strategies that need no other's ranking and train from a unit above
    # the first; those that need a ranking (after it); the whole network's.
    registry = strategies.REGISTRY
    top = [s for s in plan.strategies if not registry[s].after and not registry[s].whole_network]
    ranked = [s for s in plan.strategies if registry[s].after]
    for phase in (top, ranked, list(strategies.WHOLE_NETWORK)):
        phase = [s for s in phase if s in plan.strategies]
        for strategy in phase:  # from the layers its `after` ranked: the same on every process
            after = registry[strategy].after
            if after:
                ranked_rows = [r for r in search.ledger.rows if r["strategy"] == after]
                ranking = list(dict.fromkeys(layer for c in rank(ranked_rows)
                                             for layer in c["layers"]))
                plan.planned[strategy] = candidates(config, search.table, strategy, ranking)
        if phase and phase[0] in strategies.WHOLE_NETWORK:
            for unit in plan.engines:
                if unit != plan.first_unit:
                    search.engines.release(unit)
        if phase:
            training += _train_phase(search, phase)

    # This process's compilations per engine (the plan's count, one train step per engine, is
    # in summary.json): one per cohort size it trained or tried for its placement; more means
    # a size compiled twice.
    counts = search.engines.compilations()
    for unit, count in counts.items():
        if count["train"] > len(count["cohorts"]):
            log.warning("The train step from unit %s compiled %d times for cohorts of %s", unit,
                        count["train"], count["cohorts"])
    log.info("Compilations in this run: %s", counts)
    search.engines.shutdown()
    summary = multihost.broadcast_json(lambda: _summarize(search))
    summary["best_model"] = _save_best(search, summary["winner"])
    wd.write_json("summary.json", summary)
    if wd.writer:
        report.write(wd.path)
    return summary, counts, training


def _train_phase(search: Search, names: list[str]) -> float:
    """Trains the strategies' (`names`) runs rung by rung (one rung: the paper's protocol): at
    each rung, every run of the candidates still searched in the pools that stop there, engine
    by engine in cohorts, up to the rung's epochs; then each such pool decides which go on
    (`decisions`). The strategies in rounds follow, one after another. Returns the training
    seconds."""
    plan = search.plan
    in_rounds = [s for s in names if strategies.REGISTRY[s].rounds]
    pools = [(pool, members) for s in names if s not in in_rounds
             for pool, members in plan.pools(s).items()]
    training = 0.0
    for rung, budget in enumerate(plan.rungs):
        stopping = [(pool, members) for pool, members in pools if halving.stops(
            len(search.decisions.alive(pool, members, rung)), budget, plan.eta)]
        alive = [g for pool, members in stopping
                 for g in search.decisions.alive(pool, members, rung)]
        training += _train_engines(search, search.ledger.unfinished(alive, budget), alive, rung)
        if not budget.final:
            for pool, members in stopping:
                for group in search.decisions.decide(pool, members, rung):
                    _promote(search, group)
    for strategy in in_rounds:
        training += _train_rounds(search, strategy)
    for strategy in names:  # after an interruption between a record and its model
        for group in plan.planned[strategy]:
            _promote(search, group)
    return training


def _train_engines(search: Search, jobs: list, members: list[Group], rung: int,
                   budget: halving.Rung | None = None) -> float:
    """Trains `jobs`, the unfinished runs of `members` at rung `rung` (`budget`'s epochs and
    seeds, when given: a round's), engine by engine, the shallowest first (`_train_runs`)."""
    plan, training = search.plan, 0.0
    budget = budget or plan.rungs[rung]
    by_unit = {u: [job for job in jobs if plan.engine_of(job[0]) == u]
               for u in sorted(plan.from_units, key=plan.units.index, reverse=True)}
    by_unit = {u: mine for u, mine in by_unit.items() if mine}
    runs = {u: len(budget.seeds) * sum(plan.engine_of(g) == u for g in members) for u in by_unit}
    search.engines.compile_ahead(runs, budget.epochs)
    for unit, mine in by_unit.items():
        training += _train_runs(search, mine, unit, rung, budget, runs[unit])
    return training


def _train_rounds(search: Search, strategy: str) -> float:
    """A strategy in rounds (subtuning.py): each round's candidates train the round's budget
    (its early seeds), then the round's decision (schedule.json) prunes all but the candidate
    chosen; after the last round, the chosen trains every seed to the end (its early seeds
    from where they stopped). A rerun walks the same rounds from the decisions kept.
    Returns the training seconds."""
    plan, config = search.plan, search.config
    budget = round_rung(config, plan.rungs)
    limit = subtuning.rounds_allowed(config, search.table)
    previous, sizes, training = None, [], 0.0
    for index in range(1, limit + 1):
        members = candidates(config, search.table, strategy, previous and previous[1])
        known = {g.candidate for g in plan.planned[strategy]}
        plan.planned[strategy] += [g for g in members if g.candidate not in known]
        sizes.append(len(members))
        training += _train_engines(search, search.ledger.unfinished(members, budget), members,
                                   0, budget)
        entry = search.decisions.decide_round(strategy, index, members, previous, budget,
                                              last=index == limit)
        if entry["stop"]:
            break
        previous = (entry["chosen"], tuple(entry["units"]), entry["accuracy"][entry["chosen"]])
    # The progress counted every round allowed; a search that stopped early records fewer.
    search.progress.total += (subtuning.expected(sizes, budget, plan.rungs[-1])[0]
                              - plan.expected(strategy)[0])
    chosen = next(g for g in plan.planned[strategy] if g.candidate == entry["chosen"])
    return training + _train_engines(search, search.ledger.unfinished([chosen], plan.rungs[-1]),
                                     [chosen], len(plan.rungs) - 1)


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
        durable.copy_tree(source.parent, search.wd.path / BEST_MODEL)
    return BEST_MODEL


def _summarize(search: Search) -> dict:
    """The summary, with the paired comparisons its predictions allow (on process 0)."""
    args = (search.config, search.ledger.rows, len(search.plan.from_units))
    try:
        summary = results.summarize(*args, predictions_dir=search.ledger.predictions_dir)
    except results.StalePredictionsError as e:  # never lose the summary of a whole search
        log.warning("No paired comparisons: %s", e)
        summary = results.summarize(*args)
    budget = round_rung(search.config, search.plan.rungs)
    rounds = {s: search.decisions.rounds(s, budget) for s in search.plan.strategies
              if strategies.REGISTRY[s].rounds}
    if rounds:  # each round's decision, for the report's table of rounds
        summary["rounds"] = rounds
    in_rounds = {round_pool(s, e["round"]) for s, entries in rounds.items() for e in entries}
    if len(search.plan.rungs) > 1:  # what each rung decided, for the report
        summary["halving"] = {"rungs": [{"epochs": r.epochs, "seeds": len(r.seeds)}
                                        for r in search.plan.rungs],
                              "decisions": search.decisions.of_rungs(in_rounds)}
    return summary


def _train_runs(search: Search, runs: list[tuple[Group, int]], from_unit: str,
                rung: int, budget: halving.Rung, total: int) -> float:
    """Trains (candidate, seed) runs of one engine up to `budget`'s epochs (rung `rung`'s, or a
    round's), in cohorts of the size that `total` runs (the rung's in this engine, finished or
    not) call for (`Engines.cohort_for`; the last one padded): at the last rung a run is
    recorded (its row, best variables and predictions), before it parked (it goes on, or is
    recorded when pruned); a run that diverged is recorded where it stopped. Returns the
    seconds spent training."""
    search.progress.plan(from_unit, 0)
    search.engines.prepare(from_unit, len(runs))
    size = search.engines.cohort_for(from_unit, total, budget.epochs).size
    training = 0.0
    for start in range(0, len(runs), size):
        chunk = runs[start:start + size]
        started = time.perf_counter()
        finished, ckpt = search.run_cohort(chunk, from_unit, rung, budget, size)
        training += time.perf_counter() - started
        _keep(search, chunk, finished, ckpt, budget.final)
        del finished  # the runs' device variables, let go before the next cohort trains
    return training


def _keep(search: Search, chunk: list, finished: list, ckpt, final: bool) -> None:
    """What a cohort's runs leave: at the last rung (or diverged) their records, before it
    their parked state; then the checkpoint goes."""
    for (group, seed), (row, result) in zip(chunk, finished):
        if final or result.status == "diverged":
            _record(search, group, seed, row, result)
            search.ledger.unpark(group.candidate, seed)
        else:
            search.ledger.park(group.candidate, seed, result.stopped, row, result.predictions)
    ckpt.clear()
    if final:
        for group in dict.fromkeys(g for g, _ in chunk):
            _promote(search, group)


def _record(search: Search, group: Group, seed: int, row: dict,
            result: cohort_lib.FitResult) -> None:
    """A finished run: its best variables (pending/) and predictions, then its row."""
    wd = search.wd
    if wd.writer:  # before the row: a row always has its model and predictions
        if result.best_variables is not None:
            weights.save_variables(_pending(wd, group.candidate, seed), result.best_variables)
        predictions = result.predictions or {
            "validation": np.full(len(search.dataset.validation), -1), "test": None}
        results.write_predictions(search.ledger.predictions_dir, group.candidate, seed,
                                  predictions["validation"], predictions["test"])
    search.progress.finished(search.ledger.add(row))


def _pending(wd: Workdir, candidate: str, seed: int) -> Path:
    """Where a finished run's best variables wait: until its candidate's seeds are all done,
    and then, for the leading candidate's best seed, until its strategy is finished."""
    return wd.path / "pending" / f"{results.slug(candidate)}-seed{seed}.msgpack"


def _promote(search: Search, group: Group) -> None:
    """Once `group` is finished (all its seeds recorded, or pruned): of its strategy's finished
    candidates, the leader keeps its best seed's variables in pending/ and the others' are
    deleted; once every candidate of the strategy is finished, the leader is saved as
    models/<strategy>/ (one save per strategy). Decided from the rows every process shares;
    process 0 reads the variables it wrote and sends them to all (orbax saves collectively);
    only process 0 deletes."""
    wd, seeds = search.wd, search.config.train.seeds
    by_candidate: dict[str, list[dict]] = {}
    for r in search.ledger.rows:
        if r["strategy"] == group.strategy:
            by_candidate.setdefault(r["candidate"], []).append(r)
    finished = {c: rs for c, rs in by_candidate.items()
                if len(rs) >= seeds or any(r["status"] == "pruned" for r in rs)}
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
            "layers": list(group.layers), "option": group.option,
            "setting": {**settings.of_group(group),
                        "head_learning_rate": search.config.train.head_learning_rate},
            "seed": seed,
            "model": model,
            "input_size": model["input_size"],
            "preprocessing": type(search.module).preprocessing,
            "class_names": list(search.dataset.class_names),
            "dataset": search.config.data.name}


