"""The search end to end on 2 processes (localhost, gloo): every strategy, and kill -9 of both
processes mid-search then a restart (its processes' clocks disagreeing on when to checkpoint),
which must end with the uninterrupted run's summary and saved models. Process 0 decides and
writes; the others never read what it writes."""
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from blockft_jax.candidates import strategies
from test_newcomer import assert_best_is_the_winner
from test_search import assert_same_models, same_engines

WORKER = Path(__file__).with_name("search_worker.py")
ROOT = Path(__file__).parents[1]
TIMEOUT = 600
EXIT_UNSUPPORTED = 77
# configs/tiny.py's runs, one seed and two epochs (halving is the exhaustive protocol there):
# classifier_only 1, layerwise 3, topk 1, blocks 2, window 2, full 1, llrd 1, gradual 2 (epochs
# per unit), lp_ft 1, l2sp 1, auto_rgn 1; subtuning's two rounds 3 + 1, its chosen recorded once.
RUNS = 20

pytestmark = pytest.mark.slow  # two processes, a search each, then killed and restarted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir: Path, die_after: int | None = None, skewed: bool = False, bad: bool = False
          ) -> list[subprocess.Popen]:
    port = free_port()
    extra = (["skewed"] if skewed else ["bad"] if bad else [] if die_after is None
             else [str(die_after)])
    return [subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), "2",
                              str(workdir), *extra], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]


def finish(processes) -> list[str]:
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in processes]
    if any(p.returncode == EXIT_UNSUPPORTED for p in processes):
        pytest.skip("CPU multi-process collectives are not available here")
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_processes")
    return workdir, finish(start(workdir))


def test_two_process_search_runs_every_strategy_with_one_log(uninterrupted):
    workdir, (leader, other) = uninterrupted
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["strategies"]) == set(strategies.SEARCH_ORDER)
    assert "comparisons" in summary
    rows = (workdir / "results.jsonl").read_text().splitlines()
    assert len(rows) == RUNS
    # One copy of the search's progress: process 0's.
    assert f"[{RUNS}/{RUNS}]" in leader and "Winner:" in leader
    assert f"[1/{RUNS}]" not in other and "Winner:" not in other
    assert_best_is_the_winner(workdir)  # models/best, copied by process 0


def test_kill_both_processes_and_restart_gives_the_same_summary_and_models(uninterrupted,
                                                                           tmp_path):
    whole, _ = uninterrupted
    same_engines(whole, tmp_path)
    processes = start(tmp_path, die_after=3)
    leader = processes[0]
    leader_output = leader.communicate(timeout=TIMEOUT)[0]
    if leader.returncode == EXIT_UNSUPPORTED:
        pytest.skip("CPU multi-process collectives are not available here")
    assert leader.returncode == -signal.SIGKILL, leader_output[-4000:]
    processes[1].send_signal(signal.SIGKILL)  # the other process of the preempted slice
    processes[1].communicate(timeout=60)
    done = (tmp_path / "results.jsonl").read_text().splitlines()
    assert 0 < len(done) < RUNS
    assert (tmp_path / "checkpoints" / "current.json").exists()
    # Restarted with clocks that disagree on when a checkpoint is due: process 0's decides
    # (entered apart, the checkpoint's collectives would hang both).
    finish(start(tmp_path, skewed=True))
    assert (json.loads((tmp_path / "summary.json").read_text()) ==
            json.loads((whole / "summary.json").read_text()))
    assert_same_models(whole, tmp_path)


def test_a_mistake_on_every_process_ends_each_with_one_line(tmp_path):
    """`--distributed` and a config mistake found after joining: every process leaves the
    distributed service before it exits, so each ends with the mistake's one line and exit
    status 2, not an abort in the service's shutdown."""
    processes = start(tmp_path / "wd", bad=True)
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in processes]
    for p, out in zip(processes, outputs):
        assert p.returncode == 2, out[-4000:]
        assert "train.epochs=0" in out and "Traceback" not in out, out[-4000:]
