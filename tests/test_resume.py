"""An interrupted search always resumes: killed (SIGKILL, as a preempted VM dies) right after a
checkpoint in each phase of a search -- the top engine's cohorts, full fine-tuning's cohort (no
frozen variables at all), gradual unfreezing's and Auto-RGN's (masks that change between
epochs), a run that had diverged -- then rerun with the same command, it ends
with the uninterrupted search's summary.json, rows and saved models, bitwise."""
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


def killed_then_resumed(workdir: Path, overrides: dict, kill_at: str,
                        diverge_at: str | None = None, *, like: Path) -> str:
    """Killed at `kill_at`, then the same command: in the engines of `like`, the uninterrupted
    search it is compared with."""
    same_engines(like, workdir)
    cut = search(workdir, overrides, kill_at, diverge_at)
    assert cut.returncode == -9, (cut.returncode, cut.stdout[-3000:] + cut.stderr[-3000:])
    assert (workdir / "checkpoints" / "current.json").exists()
    finished(workdir, overrides, diverge_at)
    return cut.stdout


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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return finished(tmp_path_factory.mktemp("whole"), ALL_STRATEGIES)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["top", "full", "gradual", "auto_rgn"])
def test_killed_in_each_phase_resumes_bitwise(uninterrupted, tmp_path, phase):
    """kill -9 right after the first checkpoint of the top engine's cohorts, of full
    fine-tuning's cohort, or of a cohort holding runs whose masks change between epochs
    (gradual unfreezing; Auto-RGN, whose next masks are measured from the restored state),
    then the same command again."""
    out = killed_then_resumed(tmp_path, ALL_STRATEGIES, phase, like=uninterrupted)
    assert "KILLED" in out, out[-2000:]
    assert ("'full'" not in out) if phase == "top" else (f"'{phase}" in out), out[-2000:]
    assert_same_search(uninterrupted, tmp_path)


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
