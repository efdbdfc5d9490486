"""Durable writes (blockft_jax/common/durable.py): killed at any point, a file is its old
version or its new one, a log of rows loses at most the row being written (and heals), a
directory is the old copy or the new one."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from blockft_jax.common import durable

WRITER = """
import json, sys
from pathlib import Path
from blockft_jax.common import durable
root = Path(sys.argv[1])
start = int(sys.argv[2])
for i in range(start, start + 100000):
    durable.write_atomic(root / "state.json", json.dumps({"i": i, "pad": "x" * (i % 5000)}))
    durable.append_line(root / "rows.jsonl", json.dumps({"i": i, "pad": "y" * (i % 3000)}))
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "weights").write_text(str(i) * 2000)
    durable.copy_tree(root / "model", root / "best")
"""


def check(root):
    """What a reader finds after a kill: each file whole."""
    state = json.loads((root / "state.json").read_text())
    assert state["pad"] == "x" * (state["i"] % 5000)
    rows = [json.loads(line) for line in durable.read_lines(root / "rows.jsonl")]
    assert [r["i"] for r in rows] == list(range(len(rows)))  # nothing lost but the last
    assert all(r["pad"] == "y" * (r["i"] % 3000) for r in rows)
    durable.restore_tree(root / "best")
    text = (root / "best" / "weights").read_text()
    assert len(text) % 2000 == 0 and text == text[:len(text) // 2000] * 2000
    return len(rows)


def test_killed_at_any_point_every_file_is_whole(tmp_path):
    rows = 0
    for kill in range(6):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(rows)])
        time.sleep(1.5 + 0.37 * kill)  # at a different point of the loop each time
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        rows = check(tmp_path)
    assert rows > 6


def test_a_torn_row_is_left_out_then_cut_off(tmp_path):
    path = tmp_path / "results.jsonl"
    durable.append_line(path, '{"run": 1}')
    with open(path, "a") as f:
        f.write('{"run": 2, "val')  # a kill in the middle of a row
    assert durable.read_lines(path) == ['{"run": 1}']
    durable.append_line(path, '{"run": 3}')
    assert path.read_text() == '{"run": 1}\n{"run": 3}\n'


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    durable.write_atomic(path, "old")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "replace", full_disk)
    with pytest.raises(OSError):
        durable.write_atomic(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


def test_a_kill_between_the_renames_of_a_tree_is_undone(tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "model.json").write_text("new")
    best = tmp_path / "best"
    best.mkdir()
    (best / "model.json").write_text("old")
    os.replace(best, tmp_path / ".best.old")  # the first rename done, the second not
    durable.copy_tree(tmp_path / "source", best)
    assert (best / "model.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["best", "source"]
