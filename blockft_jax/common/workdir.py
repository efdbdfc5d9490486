"""The search's working directory: one owner at a time, atomic writes, resumable results."""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from blockft_jax.common import durable, multihost
from blockft_jax.common.durable import write_atomic
from blockft_jax.common.errors import UserError

RESULTS = "results.jsonl"
CONFIG = "config.json"
LOG = "search.log"
PARKED = "parked"  # runs stopped at a rung of a halving search
ENGINES = "engines.json"  # the split of the candidates into engines by depth
TENSORBOARD = "tensorboard"  # each run's scalars
# Config keys that cannot change a search's results: a rerun that changes only these resumes.
RESUME_NEUTRAL = ("train.checkpoint_seconds", "train.prefix_cache", "data.data_dir")
# What a search writes before its first run finishes that follows from its config alone (the
# engines' split, the first cohort's scalars included): a search with no finished run gives way
# to a rerun with another config, and these go. Anything else it left (a first cohort's
# checkpoint) is moved to archive/<time>/, never deleted.
BEFORE_TRAINING = (CONFIG, "cohorts.json", "predictions", "skipped_files.txt", ENGINES,
                   TENSORBOARD)
KEPT = (LOG, ".lock", "archive")

log = logging.getLogger(__name__)


class WorkdirError(UserError, RuntimeError):
    """The workdir cannot be used as asked (busy, or holds another search)."""


class Workdir:
    """On several hosts every process runs the search (the workdir must be shared storage,
    e.g. a gcsfuse or NFS mount); only process 0 reads its decisions and writes to it, and the
    others get its answers by broadcast (`multihost`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.writer = multihost.is_leader()
        self._lock_file = None

    # -- ownership -----------------------------------------------------------------------------
    def lock(self) -> None:
        """Refuses a second process on the same workdir (an OS lock: freed if we die)."""
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise WorkdirError(f"{self.path} is in use by {holder}. Wait for it to finish, "
                                   f"or use another --workdir.") from None
            raise
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.truncate(0)  # names no process once it is free
            self._lock_file.flush()
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- the config it belongs to --------------------------------------------------------------
    def claim(self, config_dict: dict, start_over: bool) -> None:
        """Ties the workdir to one config. A config that differs in keys that can change
        results is refused, or with `start_over` the earlier contents are moved to
        archive/<time>/ (never deleted); other differences (RESUME_NEUTRAL) resume. A search
        with no finished run (it stopped at a mistake, a failed compilation, an interruption
        before its first run ended) gives way to the new config. Decided on process 0, which
        alone writes."""
        def decide() -> dict:
            stored = self.path / CONFIG
            if not stored.exists():
                return {"action": "new"}
            previous, current = _dotted(json.loads(stored.read_text())), _dotted(config_dict)
            changed = sorted(k for k in set(previous) | set(current)
                             if previous.get(k) != current.get(k))
            blocking = [k for k in changed if k not in RESUME_NEUTRAL]
            if blocking:
                action = ("archive" if start_over else "restart" if not self.finished_runs()
                          else "refuse")
                return {"action": action, "changed": blocking}
            return {"action": "resume", "changed": changed}

        decision = multihost.broadcast_json(decide)
        if decision["action"] == "refuse":
            raise WorkdirError(
                f"{self.path} holds a search with a different config (differs in: "
                f"{', '.join(decision['changed'])}). Use another --workdir, or pass "
                f"--start_over to archive the earlier results and start again.")
        if decision["action"] == "archive":
            self.archive()
        if decision["action"] == "restart":
            log.info("%s holds a search that trained nothing, with %s different: starting "
                     "afresh with this config", self.path, ", ".join(decision["changed"]))
            if self.writer:
                for name in BEFORE_TRAINING:
                    durable.remove(self.path / name)
                if any(e.name not in KEPT for e in self.path.iterdir()):
                    log.info("Its other files (an unfinished run's checkpoint) moved to %s",
                             self.archive())
        if decision.get("changed") and decision["action"] == "resume":
            log.info("Resuming with %s changed (they do not change results)",
                     ", ".join(decision["changed"]))
        if self.writer:
            write_atomic(self.path / CONFIG, json.dumps(config_dict, indent=2, sort_keys=True))
        multihost.barrier("workdir claimed")

    def finished_runs(self) -> bool:
        """Whether any run of the search here has finished: a row in results.jsonl, or a run
        parked at a rung of a halving search."""
        parked = self.path / PARKED
        return bool(self.results()) or (parked.is_dir() and any(parked.iterdir()))

    def archive(self) -> Path:
        """The earlier search's files moved to archive/<time>/ (never deleted). Its log is
        copied there and kept: this process already writes to it."""
        if not self.writer:
            return self.path / "archive"
        target = self.path / "archive" / time.strftime("%Y%m%d-%H%M%S")
        target.mkdir(parents=True)
        for entry in self.path.iterdir():
            if entry.name == LOG:
                shutil.copy2(entry, target / entry.name)
            elif entry.name not in ("archive", ".lock"):
                shutil.move(str(entry), target / entry.name)
        return target

    # -- results -------------------------------------------------------------------------------
    def results(self) -> list[dict[str, Any]]:
        """Every whole row (one a kill tore is left out: its run trains again)."""
        return read_results(self.path)

    def append_result(self, row: dict[str, Any]) -> None:
        """Adds one row at the end, synced: the cost of a row, not of the file."""
        if self.writer:
            durable.append_line(self.path / RESULTS, json.dumps(row))

    def write_json(self, name: str, value: Any) -> None:
        if self.writer:
            write_atomic(self.path / name, json.dumps(value, indent=2) + "\n")


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """results.jsonl's whole rows in the workdir at `path`, on any process (scripts reading a
    finished search included)."""
    return [json.loads(line) for line in durable.read_lines(Path(path) / RESULTS)]


def jsonable(config) -> dict:
    """A config as plain JSON-able dicts (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict(), default=list))


def _dotted(tree: dict, prefix: str = "") -> dict:
    """{'train.epochs': 10, ...} from nested dicts."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def finished_keys(rows: Iterable[dict]) -> set[tuple[str, int]]:
    return {(r["candidate"], r["seed"]) for r in rows}
