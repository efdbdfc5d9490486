"""The search's working directory: one owner at a time, atomic writes, resumable results."""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from blockft_jax import multihost
from blockft_jax.errors import UserError

RESULTS = "results.jsonl"
CONFIG = "config.json"
# Config keys that cannot change a search's results: a rerun that changes only these resumes.
RESUME_NEUTRAL = ("train.checkpoint_seconds", "train.prefix_cache", "data.data_dir")

log = logging.getLogger(__name__)


class WorkdirError(UserError, RuntimeError):
    """The workdir cannot be used as asked (busy, or holds another search)."""


def write_atomic(path: Path, text: str) -> None:
    """Write-then-rename: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


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
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- the config it belongs to --------------------------------------------------------------
    def claim(self, config_dict: dict, start_over: bool) -> None:
        """Ties the workdir to one config. A config that differs in keys that can change
        results is refused, or with `start_over` the earlier contents are moved to
        archive/<time>/ (never deleted); other differences (RESUME_NEUTRAL) resume. Decided on
        process 0, which alone writes."""
        def decide() -> dict:
            stored = self.path / CONFIG
            if not stored.exists():
                return {"action": "new"}
            previous, current = _dotted(json.loads(stored.read_text())), _dotted(config_dict)
            changed = sorted(k for k in set(previous) | set(current)
                             if previous.get(k) != current.get(k))
            blocking = [k for k in changed if k not in RESUME_NEUTRAL]
            if blocking:
                return {"action": "archive" if start_over else "refuse", "changed": blocking}
            return {"action": "resume", "changed": changed}

        decision = multihost.broadcast_json(decide)
        if decision["action"] == "refuse":
            raise WorkdirError(
                f"{self.path} holds a search with a different config (differs in: "
                f"{', '.join(decision['changed'])}). Use another --workdir, or pass "
                f"--start_over to archive the earlier results and start again.")
        if decision["action"] == "archive":
            self.archive()
        if decision.get("changed") and decision["action"] == "resume":
            log.info("Resuming with %s changed (they do not change results)",
                     ", ".join(decision["changed"]))
        if self.writer:
            write_atomic(self.path / CONFIG, json.dumps(config_dict, indent=2, sort_keys=True))
        multihost.barrier("workdir claimed")

    def archive(self) -> Path:
        if not self.writer:
            return self.path / "archive"
        target = self.path / "archive" / time.strftime("%Y%m%d-%H%M%S")
        target.mkdir(parents=True)
        for entry in self.path.iterdir():
            if entry.name not in ("archive", ".lock"):
                shutil.move(str(entry), target / entry.name)
        return target

    # -- results -------------------------------------------------------------------------------
    def results(self) -> list[dict[str, Any]]:
        path = self.path / RESULTS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def append_result(self, row: dict[str, Any]) -> None:
        """Adds one row; the whole file is rewritten atomically, so it is never torn."""
        if not self.writer:
            return
        rows = self.results() + [row]
        write_atomic(self.path / RESULTS, "".join(json.dumps(r) + "\n" for r in rows))

    def write_json(self, name: str, value: Any) -> None:
        if self.writer:
            write_atomic(self.path / name, json.dumps(value, indent=2) + "\n")


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
