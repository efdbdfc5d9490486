"""What survives a process: the running candidate's checkpoint, and the saved models.

Both are orbax checkpoints. On several processes every process takes part in an orbax save or
restore (each writes or reads its share); metadata files are written by process 0 only, and
what to restore is decided there (`multihost.broadcast_json`).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from blockft_jax import multihost, train
from blockft_jax.workdir import write_atomic

log = logging.getLogger(__name__)


class _EpochCheckpoints:
    """What the run and the cohort checkpoints share: `epoch<N>` orbax directories under
    `path`, written asynchronously (training goes on while one is written; orbax renames it
    into place only when complete, so the newest is always whole), only the newest kept, and
    current.json beside them saying whose they are."""

    def __init__(self, path: Path):
        self.path = Path(path).absolute()
        self.ckptr = ocp.StandardCheckpointer()

    @property
    def meta_path(self) -> Path:
        return self.path.parent / "current.json"

    def _epochs(self) -> list[int]:
        return sorted(int(p.name[5:]) for p in self.path.glob("epoch*") if p.name[5:].isdigit())

    def _write(self, meta: dict, epoch: int, tree) -> None:
        self.ckptr.wait_until_finished()  # the previous epoch's save
        if multihost.is_leader():
            write_atomic(self.meta_path, json.dumps(meta))
            for old in self._epochs()[:-1]:
                shutil.rmtree(self.path / f"epoch{old}", ignore_errors=True)
        self.ckptr.save(self.path / f"epoch{epoch}", tree, force=True)

    def clear(self) -> None:
        self.ckptr.wait_until_finished()
        if multihost.is_leader():
            self.meta_path.unlink(missing_ok=True)
            shutil.rmtree(self.path, ignore_errors=True)


class Checkpoint(_EpochCheckpoints):
    """The running (candidate, seed)'s train state, saved after an epoch with the variables of
    its best epoch so far, so an interrupted search continues from its last saved epoch and
    still knows its best one; current.json names the candidate and holds the history."""

    def __init__(self, path: Path, candidate: str, seed: int):
        super().__init__(path)
        self.candidate, self.seed = candidate, seed

    def _saved_epoch(self) -> dict | None:
        """{'epoch', 'history'} of the newest whole checkpoint of this run, or None."""
        if not self.meta_path.exists():
            return None
        meta = json.loads(self.meta_path.read_text())
        if (meta["candidate"], meta["seed"]) != (self.candidate, self.seed):
            return None
        epochs = [e for e in self._epochs() if e <= len(meta["history"])]
        return {"epoch": epochs[-1], "history": meta["history"][:epochs[-1]]} if epochs else None

    def restore(self, template_state) -> dict:
        """{'state', 'start_epoch', 'history', 'best_variables'} for train.fit(), or {} when
        there is nothing to resume."""
        saved = multihost.broadcast_json(self._saved_epoch)
        if saved is None:
            return {}
        epoch = saved["epoch"]
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template_state)
        target = {"state": abstract, "best": {"params": abstract["params"],
                                              "batch_stats": abstract["batch_stats"]}}
        restored = self.ckptr.restore(self.path / f"epoch{epoch}", target)
        log.info("Resuming %s seed %d after epoch %d", self.candidate, self.seed, epoch)
        sharding = jax.tree.leaves(template_state)[0].sharding
        return {"state": jax.device_put(restored["state"], sharding), "start_epoch": epoch,
                "history": saved["history"], "best_variables": jax.device_get(restored["best"])}

    def save(self, state, history: list[dict], epoch: int, best_variables) -> None:
        """`state` after `epoch` epochs, with `best_variables` (those of the best epoch so far,
        which train.fit tracks)."""
        self._write({"candidate": self.candidate, "seed": self.seed, "history": history},
                    epoch, {"state": state, "best": best_variables})


MODEL_META = "model.json"


def save_model(path, variables, meta: dict) -> None:
    """Fine-tuned variables as an orbax checkpoint {'params','batch_stats'} + model.json.
    Every process calls it with the same variables (orbax saves collectively)."""
    path = Path(path).absolute()
    if multihost.is_leader():
        path.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path / "variables", jax.tree.map(np.asarray, dict(variables)), force=True)
    ckptr.wait_until_finished()
    if multihost.is_leader():
        write_atomic(path / MODEL_META, json.dumps(meta, indent=2, default=list))


def load_model(path) -> tuple[dict, dict]:
    """(variables, model.json) of a saved models/<strategy>/ directory."""
    path = Path(path).absolute()
    if not (path / MODEL_META).exists():
        raise FileNotFoundError(f"{path} is not a saved model (no {MODEL_META}); pass a "
                                f"WORKDIR/models/<strategy> directory of a finished search.")
    meta = json.loads((path / MODEL_META).read_text())
    return ocp.StandardCheckpointer().restore(path / "variables"), meta


class CohortCheckpoint(_EpochCheckpoints):
    """A cohort's runs (`cohort.Cohort`), saved together after an epoch: every run's live state
    (its trained layers, their optimizer state, its step) with its history and the live layers
    of its best epoch so far. The frozen variables are not saved: they are the search's
    starting weights, never changed by training, and a rerun loads them again (so a checkpoint
    costs the live layers, never a copy of the whole model per run). current.json names the
    runs; a rerun resumes them only as the same cohort (the search forms its cohorts in plan
    order with a fixed size, so it does)."""

    def __init__(self, path: Path, keys: list[tuple[str, int]], cohort):
        super().__init__(path)
        self.keys = [list(k) for k in keys]
        self.cohort = cohort

    def _saved_epoch(self) -> dict | None:
        if not self.meta_path.exists():
            return None
        meta = json.loads(self.meta_path.read_text())
        if meta.get("cohort") != self.keys:
            return None
        epochs = [e for e in self._epochs() if e <= meta["epoch"]]
        if not epochs:
            return None
        epoch = epochs[-1]
        histories = [[h for h in history if h["epoch"] <= epoch]
                     for history in meta["histories"]]
        best = [i for i, h in enumerate(histories) if train.best_record(h) is not None]
        return {"epoch": epoch, "histories": histories, "best": best}

    def restore(self, make_template) -> list[dict] | None:
        """Per run, what `cohort.fit_cohort` resumes from ({'state', 'start_epoch', 'history',
        'best_variables'}), or None when there is nothing to resume. `make_template()` gives a
        CohortState of the same runs (built only when there is a checkpoint; its frozen
        variables are the ones the runs resume with)."""
        saved = multihost.broadcast_json(self._saved_epoch)
        if saved is None:
            return None
        template_state = make_template()
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        live_like = {"params": template_state.runs["params"],
                     "batch_stats": template_state.runs["batch_stats"]}
        one_run = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), live_like)
        target = {"runs": abstract(template_state.runs),
                  "best": {str(i): one_run for i in saved["best"]}}
        restored = self.ckptr.restore(self.path / f"epoch{saved['epoch']}", target)
        state = type(template_state)(template_state.shared, jax.device_put(
            restored["runs"], self.cohort.replicated))
        log.info("Resuming a cohort of %d runs after epoch %d", len(self.keys), saved["epoch"])
        shared = jax.device_get(template_state.shared)
        best = {int(i): self.cohort.whole(shared, jax.device_get(live))
                for i, live in restored["best"].items()}
        return [{"state": self.cohort.run_state(state, i), "start_epoch": saved["epoch"],
                 "history": history, "best_variables": best.get(i)}
                for i, history in enumerate(saved["histories"])]

    def save(self, state, histories: list[list[dict]], epoch: int, best_variables) -> None:
        """The cohort's live state after `epoch` epochs, with each run's `histories` and the
        live layers of its `best_variables` (host copies, as fit_cohort keeps them)."""
        best = {str(i): self.cohort.live_variables(b) for i, b in enumerate(best_variables)
                if b is not None}
        self._write({"cohort": self.keys, "epoch": epoch, "histories": histories}, epoch,
                    {"runs": state.runs, "best": best})


def cohort_checkpoint_bytes(cohort, variables) -> int:
    """Bytes of array data one CohortCheckpoint of `cohort` writes, from shapes alone: every
    run's live state (CohortState.runs) and every run's best live layers."""
    nbytes = lambda tree: sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                              for x in jax.tree.leaves(tree))
    best = cohort.live_variables(variables)
    return nbytes(cohort.abstract_runs(variables)) + cohort.size * nbytes(best)
