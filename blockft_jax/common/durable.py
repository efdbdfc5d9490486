"""Durable writes, one place for all of them: a file is either the old one or the new one, never
half of one, whatever kills the process and wherever.

- `write(path, fill)` / `write_atomic(path, text)` / `write_bytes(path, data)`: into a temporary
  file of its own beside the target (no two writers share one, whichever host or process),
  synced to disk, then renamed over the target, and the directory synced so the rename lasts.
- `append_line(path, line)`: one JSON line at the end of a log-like file (results.jsonl,
  runs.jsonl), synced; the cost of a row, not of the file. A kill mid-write can leave a torn
  last line: `read_lines` leaves it out and the next `append_line` cuts it off first.
- `copy_tree(source, target)`: a directory replaced whole (the saved models); a kill between
  its two renames leaves the old copy aside, put back by the next call (`restore_tree`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable


def write(path, fill: Callable[[IO[bytes]], None]) -> None:
    """`fill(file)` writes the new contents; they replace `path` whole, or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def write_bytes(path, data: bytes) -> None:
    write(path, lambda f: f.write(data))


def write_atomic(path, text: str) -> None:
    write(path, lambda f: f.write(text.encode()))


def append_line(path, line: str) -> None:
    """`line` (no newline in it) added at the end of `path`, after cutting off a torn last line
    that a kill may have left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:  # appending: every write goes to the end
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":  # torn by a kill: keep only the whole lines
                f.truncate(_last_newline_end(f, end))
        f.write(line.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _last_newline_end(f, end: int) -> int:
    """Where the last whole line ends, searching back from `end` (0 when there is none)."""
    position = end
    while position > 0:
        start = max(0, position - (1 << 16))
        f.seek(start)
        chunk = f.read(position - start)
        if b"\n" in chunk:
            return start + chunk.rfind(b"\n") + 1
        position = start
    return 0


def read_lines(path) -> list[str]:
    """The whole lines of `path` (a torn last line, without its newline, left out)."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    whole = text if text.endswith("\n") else text[:text.rfind("\n") + 1]
    return [line for line in whole.splitlines() if line.strip()]


def copy_tree(source, target) -> None:
    """`target` becomes a copy of directory `source`, whole: copied beside it, then renamed
    into place. Only one process writes a workdir (its lock), so the names beside it are
    fixed and a later call finds what a kill left."""
    source, target = Path(source), Path(target)
    partial, old = _beside(target, "tmp"), _beside(target, "old")
    restore_tree(target)
    remove(partial)
    shutil.copytree(source, partial)
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    _sync_directory(target.parent)
    remove(old)


def restore_tree(target) -> None:
    """Puts back the old copy of `target` that a kill between `copy_tree`'s renames left
    aside."""
    target = Path(target)
    old = _beside(target, "old")
    if not target.exists() and old.exists():
        os.replace(old, target)


def _beside(target: Path, what: str) -> Path:
    return target.with_name(f".{target.name}.{what}")


def remove(path) -> None:
    """A file or a directory tree, gone (nothing when it is not there)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _sync_directory(directory: Path) -> None:
    """The directory's entries (a rename) on disk too; a no-op where directories cannot be
    opened (Windows) or synced (some network filesystems)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
