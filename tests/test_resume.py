"""An interrupted search always resumes: killed (SIGKILL, as a preempted VM dies) right after a
checkpoint in each phase of a search -- the top engine's cohorts with gradual unfreezing's runs
(masks that change between epochs), then, in the process that resumed it, full fine-tuning's
cohort (no frozen variables at all) with Auto-RGN's runs (next masks measured from the restored
state), a run that had diverged -- then rerun with the same command, it ends with the
uninterrupted search's summary.json, rows and saved models, bitwise."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_search import assert_same_models, same_engines

WORKER = Path(__file__).with_name("preempted_search.py")
ROOT = Path(__file__).parents[1]

# Every strategy, two seeds: the whole network's runs in cohorts, the top engine's in several.
ALL_STRATEGIES = {"train.seeds": 2, "train.checkpoint_seconds": 0.0}
# Every run diverges in its first epoch.
BLOWS_UP = {"train.optimizer": "sgd", "train.learning_rate": 1e38, "train.epochs": 2,
            "train.checkpoint_seconds": 0.0,
            "search.strategies": ["classifier_only", "layerwise"]}
# One run diverges in its second epoch (simulated: its train loss becomes NaN there).
LATE = {"train.epochs": 3, "train.checkpoint_seconds": 0.0,
        "search.strategies": ["classifier_only", "layerwise"]}
LATE_RUN = "layerwise:block_2_project_BN/0/2"


def search(workdir: Path, overrides: dict, kill_at: str = "", diverge_at: str | None = None):
    args = [sys.executable, str(WORKER), str(workdir), json.dumps(overrides), kill_at]
    args += [diverge_at] if diverge_at else []
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)


def finished(workdir: Path, overrides: dict, diverge_at: str | None = None) -> Path:
    done = search(workdir, overrides, diverge_at=diverge_at)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return workdir


def killed_in_turn(workdir: Path, overrides: dict, kill_points: list[str],
                   diverge_at: str | None = None, *, like: Path) -> list[str]:
    """Killed at each of `kill_points` in turn (each rerun resumes the last one's checkpoint and
    is killed at the next), then the same command to the end: in the engines of `like`, the
    uninterrupted search it is compared with. The killed processes' outputs (stdout, then the
    log on stderr), in order."""
    same_engines(like, workdir)
    outputs = []
    for kill_at in kill_points:
        cut = search(workdir, overrides, kill_at, diverge_at)
        assert cut.returncode == -9, (kill_at, cut.returncode,
                                      cut.stdout[-3000:] + cut.stderr[-3000:])
        assert (workdir / "checkpoints" / "current.json").exists()
        outputs.append(cut.stdout + cut.stderr)
    finished(workdir, overrides, diverge_at)
    return outputs


def killed_then_resumed(workdir: Path, overrides: dict, kill_at: str,
                        diverge_at: str | None = None, *, like: Path) -> str:
    """Killed once at `kill_at`, then the same command (see killed_in_turn)."""
    return killed_in_turn(workdir, overrides, [kill_at], diverge_at, like=like)[0]


def killed_line(output: str) -> str:
    """The worker's line saying after which epoch of which runs it killed itself."""
    (line,) = [x for x in output.splitlines() if x.startswith("KILLED")]
    return line


def rows(workdir: Path) -> dict:
    """results.jsonl by (candidate, seed), without the wall-clock seconds."""
    table = {}
    for line in (workdir / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.pop("train_seconds")
        table[row["candidate"], row["seed"]] = row
    return table


def assert_same_search(a: Path, b: Path) -> None:
    assert json.loads((a / "summary.json").read_text()) == \
        json.loads((b / "summary.json").read_text())
    assert rows(a) == rows(b)
    assert_same_models(a, b)
    assert not (b / "checkpoints" / "current.json").exists()
    assert not list((b / "pending").glob("*")) if (b / "pending").exists() else True


@pytest.mark.slow
def test_killed_in_each_phase_resumes_bitwise(tmp_path):
    """kill -9 right after the first checkpoint of the top engine's first cohort (it holds
    gradual unfreezing's runs), then, in the process that resumed it, after the first
    checkpoint of full fine-tuning's cohort (it holds Auto-RGN's), then the same command to
    the end: the uninterrupted search's files."""
    whole = finished(tmp_path / "whole", ALL_STRATEGIES)
    top, full = killed_in_turn(tmp_path / "cut", ALL_STRATEGIES, ["top", "full"], like=whole)
    top, full = killed_line(top), killed_line(full)
    assert "'gradual:" in top and "'full'" not in top, top
    assert "'full'" in full and "'auto_rgn" in full, full
    assert_same_search(whole, tmp_path / "cut")


@pytest.mark.slow
def test_a_run_diverged_in_its_first_epoch_stays_diverged(tmp_path):
    whole = finished(tmp_path / "whole", BLOWS_UP)
    killed_then_resumed(tmp_path / "cut", BLOWS_UP, "diverged", like=whole)
    resumed = rows(tmp_path / "cut")
    assert resumed == rows(whole)
    assert {r["status"] for r in resumed.values()} == {"diverged"}
    assert all(r["best_epoch"] == 0 for r in resumed.values())


@pytest.mark.slow
def test_a_run_diverged_later_stays_diverged_and_keeps_its_best_epoch(tmp_path):
    whole = finished(tmp_path / "whole", LATE, LATE_RUN)
    candidate, seed, _ = LATE_RUN.rsplit("/", 2)
    row = rows(whole)[candidate, int(seed)]
    assert (row["status"], row["epochs"], row["best_epoch"]) == ("diverged", 2, 1), row
    killed_then_resumed(tmp_path / "cut", LATE, "diverged", LATE_RUN, like=whole)
    assert rows(tmp_path / "cut")[candidate, int(seed)] == row
    assert_same_search(whole, tmp_path / "cut")
