"""What a search knows of each (candidate, seed) run: its row once finished (results.jsonl), its
parked state between rungs, and its validation predictions.

The rows are read once, on process 0, and are the same on every process; a new row is process
0's. Only process 0 writes in the workdir.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from blockft_jax.candidates import halving
from blockft_jax.candidates.groups import Group
from blockft_jax.common import multihost
from blockft_jax.common.workdir import PARKED, Workdir, finished_keys
from blockft_jax.engine import checkpoint
from blockft_jax.search import results


class Ledger:
    """The runs' records in a workdir, for a validation split of `validation_size` images."""

    def __init__(self, wd: Workdir, validation_size: int):
        self.wd = wd
        self.validation_size = validation_size
        self.predictions_dir = wd.path / results.PREDICTIONS_DIR
        self.rows: list[dict] = multihost.broadcast_json(wd.results)

    def finished(self) -> set:
        """The (candidate, seed) keys with a row."""
        return finished_keys(self.rows)

    def add(self, row: dict) -> dict:
        """Records a finished run: process 0's row, on every process, and in results.jsonl."""
        row = multihost.broadcast_json(lambda: row)
        self.rows.append(row)
        self.wd.append_result(row)
        return row

    def parked_stem(self, candidate: str, seed: int) -> Path:
        return self.wd.path / PARKED / f"{results.slug(candidate)}-seed{seed}"

    def parked(self, candidate: str, seed: int) -> dict | None:
        """A parked run's record ({'row', 'predictions', 'history'}), process 0's; None when
        it is not parked."""
        stem = self.parked_stem(candidate, seed)
        return multihost.broadcast_json(lambda: checkpoint.parked(stem))

    def park(self, candidate: str, seed: int, stopped: dict, row: dict,
             predictions: dict | None) -> None:
        """A run that goes on at a later rung: its state as it stopped, its row and its
        predictions so far (process 0 writes)."""
        if self.wd.writer:
            checkpoint.park(self.parked_stem(candidate, seed), stopped,
                            {"row": row, "predictions": listed(predictions)})

    def unpark(self, candidate: str, seed: int) -> None:
        checkpoint.unpark_clear(self.parked_stem(candidate, seed))

    def unfinished(self, members: list[Group], budget: halving.Rung) -> list:
        """The (candidate, seed) runs of `members` that `budget` still has to train: neither
        recorded nor parked at its epochs; those parked furthest first, so that runs which
        start at the same epoch share cohorts (a cohort trains from its earliest run's epoch)."""
        finished = self.finished()
        jobs = []
        for group in members:
            for seed in budget.seeds:
                key = (group.candidate, seed)
                parked = self.parked(*key)
                trained = len(parked["history"]) if parked else 0
                if key in finished or trained >= budget.epochs:
                    continue
                jobs.append((trained, group, seed))
        return [(group, seed) for _, group, seed in sorted(jobs, key=lambda job: -job[0])]

    def record_pruned(self, pruned: list[Group], seeds, recorded: Callable[[dict], None]
                      ) -> None:
        """Records the parked runs (`seeds`) of `pruned` candidates as they stand, status
        'pruned' (their predictions, then their rows, each passed to `recorded`), and unparks
        them; a run already recorded (it diverged, or an earlier run of the search recorded it)
        is left as it is."""
        finished = self.finished()
        for g in pruned:
            for seed in seeds:
                if (g.candidate, seed) in finished:
                    continue
                record = self.parked(g.candidate, seed)
                if self.wd.writer:
                    validation, test = predictions(record["predictions"])
                    results.write_predictions(
                        self.predictions_dir, g.candidate, seed,
                        np.full(self.validation_size, -1) if validation is None else validation,
                        test)
                recorded(self.add({**record["row"], "status": "pruned"}))
                self.unpark(g.candidate, seed)

    def mean_accuracy(self, members: list[Group], seeds) -> dict[str, float]:
        """Each candidate's mean validation accuracy (its best epoch so far) over `seeds`, as
        its runs stand (process 0)."""
        return {g.candidate: float(np.mean([self.standing(g.candidate, seed)[0]["val_accuracy"]
                                            for seed in seeds])) for g in members}

    def standing(self, candidate: str, seed: int) -> tuple[dict, np.ndarray]:
        """A run as it stands at a rung (process 0): its row and its validation predictions
        (-1 where it has none), parked or, had it diverged, recorded."""
        row = next((r for r in self.rows if (r["candidate"], r["seed"]) == (candidate, seed)),
                   None)
        if row is None:
            record = checkpoint.parked(self.parked_stem(candidate, seed))
            validation, _ = predictions(record["predictions"])
            row = record["row"]
        else:
            path = results.prediction_path(self.predictions_dir, candidate, seed)
            validation = np.load(path)["validation"] if path.exists() else None
        if validation is None:
            validation = np.full(self.validation_size, -1)
        return row, validation


def listed(predictions: dict | None) -> dict | None:
    """Predictions as JSON lists (a parked run's record)."""
    return None if predictions is None else {
        split: None if p is None else np.asarray(p).tolist() for split, p in predictions.items()}


def predictions(listed: dict | None) -> tuple:
    """(validation, test) predicted classes from `listed`'s form."""
    if listed is None:
        return None, None
    return tuple(None if listed.get(split) is None else np.asarray(listed[split], np.int32)
                 for split in ("validation", "test"))
