"""What survives a process: the running cohort's checkpoint, the runs parked between the rungs
of a halving search, and the saved models.

Both are orbax checkpoints. On several processes every process takes part in an orbax save or
restore (each writes or reads its share); metadata files are written by process 0 only, and
what to restore is decided there (`multihost.broadcast_json`).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization

from blockft_jax.common import durable, multihost
from blockft_jax.common.durable import write_atomic
from blockft_jax.engine import cohort as cohort_lib
from blockft_jax.engine import train

log = logging.getLogger(__name__)


class Checkpoint:
    """The running cohort's runs (`cohort.Cohort`), saved together after an epoch: every run's
    live state (its trained layers, their optimizer state, its step), the live layers of its
    best epoch so far, and its history. The frozen variables are not saved: they are the
    search's starting weights, never changed by training, and a rerun loads them again (so a
    checkpoint costs the live layers, never a copy of the whole model per run).

    Saves are numbered: `save<N>` (an orbax directory, written asynchronously: training goes
    on while one is written, and orbax renames it into place only when complete) with
    `save<N>.json` beside it, written first (the cohort's runs, its size, the epoch and each
    run's history at that epoch: a run that joined the cohort with a longer history, parked at
    a rung, is ahead of the cohort's loop). A save is whole when both exist; the newest whole
    one is kept until the next is whole. A rerun resumes each of its runs found in the newest,
    by (candidate, seed), whatever cohort it is in now. current.json names the cohort saving.
    """

    def __init__(self, path: Path, keys: list[tuple[str, int]], cohort):
        self.path = Path(path).absolute()
        self.ckptr = ocp.StandardCheckpointer()
        self.keys = [list(k) for k in keys]
        self.cohort = cohort

    @property
    def meta_path(self) -> Path:
        return self.path.parent / "current.json"

    def _saves(self) -> list[int]:
        """The numbers of the whole saves, oldest first."""
        return sorted(int(p.name[4:]) for p in self.path.glob("save*")
                      if p.name[4:].isdigit() and self._record_path(int(p.name[4:])).exists())

    def _record_path(self, number: int) -> Path:
        return self.path / f"save{number}.json"

    def _newest(self) -> dict | None:
        """The newest whole save's record ({'number', 'runs', 'size', 'epoch', 'histories'})
        when it holds any of this cohort's runs; else None."""
        saves = self._saves()
        if not saves:
            return None
        record = json.loads(self._record_path(saves[-1]).read_text())
        if not {tuple(k) for k in record["runs"]} & {tuple(k) for k in self.keys}:
            return None  # another cohort's, whose runs are recorded (or start over)
        return {**record, "number": saves[-1]}

    def restore(self, variables) -> dict[tuple[str, int], dict]:
        """{(candidate, seed): resume} for each run of this cohort that the checkpoint holds
        ({'state', 'best', 'history'}, host arrays: what `cohort.Run.resume` takes); empty
        when there is nothing to resume. `variables`: the cohort's starting variables (their
        shapes)."""
        saved = multihost.broadcast_json(self._newest)
        if saved is None:
            return {}
        stacked = lambda x: jax.ShapeDtypeStruct((saved["size"], *x.shape[1:]), x.dtype,
                                                 sharding=self.cohort.replicated)
        runs = jax.tree.map(stacked, self.cohort.abstract_runs(variables))
        target = {"runs": runs, "best": cohort_lib.live(runs)}
        restored = jax.device_get(self.ckptr.restore(self.path / f"save{saved['number']}",
                                                     target))
        mine = {tuple(k) for k in self.keys}
        resumes = {}
        for i, (key, history) in enumerate(zip(saved["runs"], saved["histories"])):
            if tuple(key) in mine:
                take = lambda tree: jax.tree.map(lambda x: np.asarray(x[i]), tree)
                resumes[tuple(key)] = {"state": take(restored["runs"]),
                                       "best": take(restored["best"]), "history": history}
        log.info("Resuming %d run(s) after epoch %d", len(resumes), saved["epoch"])
        return resumes

    def save(self, state, histories: list[list[dict]], epoch: int) -> None:
        """The cohort state after `epoch` epochs (every run's live state and best live
        variables: `state.runs`, `state.best`) with each run's history."""
        self.ckptr.wait_until_finished()  # the previous epoch's save
        number = multihost.broadcast_json(lambda: (self._saves() or [0])[-1] + 1)
        if multihost.is_leader():
            write_atomic(self.meta_path, json.dumps({"runs": self.keys, "size": self.cohort.size}))
            for old in self._saves()[:-1]:  # the newest whole one stays until this one is
                self._record_path(old).unlink(missing_ok=True)
                shutil.rmtree(self.path / f"save{old}", ignore_errors=True)
            write_atomic(self._record_path(number), json.dumps({
                "runs": self.keys, "size": self.cohort.size, "epoch": epoch,
                "histories": histories}))
        self.ckptr.save(self.path / f"save{number}", {"runs": state.runs, "best": state.best},
                        force=True)

    def clear(self) -> None:
        self.ckptr.wait_until_finished()
        if multihost.is_leader():
            self.meta_path.unlink(missing_ok=True)
            shutil.rmtree(self.path, ignore_errors=True)


def park(stem: Path, stopped: dict, record: dict) -> None:
    """A run that stopped at a rung of a halving search, until it goes on or is pruned, in two
    files written atomically by process 0: `<stem>.msgpack`, where it stopped (its live state
    and its best epoch's live variables: `cohort.FitResult.stopped`), then `<stem>.json`, its
    history and `record` (its results row and predictions as they stand). The .json is written
    last: a run is parked once it exists."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    durable.write_bytes(stem.with_suffix(".msgpack"), serialization.msgpack_serialize(
        {"state": serialization.to_state_dict(stopped["state"]),
         "best": serialization.to_state_dict(stopped["best"])}))
    write_atomic(stem.with_suffix(".json"), json.dumps({**record,
                                                         "history": stopped["history"]}))


def parked(stem: Path) -> dict | None:
    """The record of a parked run (`park`), with its history; None when it is not parked."""
    path = Path(stem).with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else None


def unpark(stem: Path, like: dict) -> dict:
    """Where a parked run stopped ({'state', 'best', 'history'}: what `cohort.Run.resume`
    takes); `like`: host arrays shaped as one run's {'state', 'best'}. Read on process 0 and
    sent to every process."""
    def read():
        raw = serialization.msgpack_restore(Path(stem).with_suffix(".msgpack").read_bytes())
        return {k: serialization.from_state_dict(like[k], raw[k]) for k in like}
    arrays = multihost.broadcast_arrays(read, like=like)
    history = multihost.broadcast_json(lambda: parked(stem)["history"])
    return {**arrays, "history": history}


def unpark_clear(stem: Path) -> None:
    """Removes a parked run (process 0): the record first, so a half-removed run is gone."""
    if multihost.is_leader():
        Path(stem).with_suffix(".json").unlink(missing_ok=True)
        Path(stem).with_suffix(".msgpack").unlink(missing_ok=True)


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


def checkpoint_bytes(cohort, variables) -> int:
    """Bytes of array data one Checkpoint of `cohort` writes, from shapes alone: every run's
    live state (CohortState.runs) and every run's best live layers."""
    return train.tree_bytes(cohort.abstract_runs(variables)) + cohort.size * train.tree_bytes(
        cohort.live_variables(variables))
