"""A successive-halving search end to end on configs/tiny.py: rungs, pruned runs recorded, only
finalists selected, every seed of the finalists trained to the end, engines by depth with one
compilation each, and a kill -9 at several points resumed to the same files, bitwise."""
import json
from pathlib import Path

import pytest

from blockft_jax.candidates import halving, strategies
from configs import tiny
from test_resume import assert_same_search, finished, killed_in_turn, killed_line, rows

# Rungs of 1, 2 and 4 epochs (3, 6 and 12 steps); the early rungs train seed 0, the last both
# seeds. The random tiny backbone sits at chance, where a rung on evidence prunes nothing
# (test_settings.py): here halving prunes on rank alone, as it did before evidence.
# Of the one-run methods, gradual unfreezing (masks that change between epochs) and Auto-RGN
# (rates and masks measured from the state): the schedule treats them all alike, and LLRD's,
# LP-FT's and L2-SP's inputs are in test_resume's and test_search's searches (37 s, not 42).
ONE_RUN = ("gradual", "auto_rgn")
HALVING = {"train.epochs": 4, "train.seeds": 2, "train.checkpoint_seconds": 0.0,
           "search.schedule": "halving", "search.eta": 2, "search.halving_seeds": 1,
           "search.min_rung_steps": 1, "search.prune_only_on_evidence": False,
           "search.strategies": [s for s in strategies.SEARCH_ORDER
                                 if s not in strategies.ONE_RUN_METHODS or s in ONE_RUN]}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return finished(tmp_path_factory.mktemp("halving"), HALVING)


def test_halving_prunes_records_and_selects_finalists(whole):
    table = rows(whole)
    summary = json.loads((whole / "summary.json").read_text())
    rungs = halving.rungs("halving", 4, 2, eta=2, halving_seeds=1)
    assert [r.epochs for r in rungs] == [1, 2, 4]
    layerwise = {key: r for key, r in table.items() if r["strategy"] == "layerwise"}
    pruned = [r for r in layerwise.values() if r["status"] == "pruned"]
    # 3 candidates: one pruned after 1 epoch, one after 2; the finalist trains both seeds.
    assert sorted((r["rung"], r["epochs"], r["seed"]) for r in pruned) == [(0, 1, 0), (1, 2, 0)]
    finalist = summary["strategies"]["layerwise"]["selected"]
    assert finalist["seeds"] == 2 and not finalist["pruned"] and finalist["rung"] == 2
    finals = [r for r in layerwise.values() if r["candidate"] == finalist["candidate"]]
    assert sorted((r["seed"], r["epochs"], r["status"]) for r in finals) == [
        (0, 4, "ok"), (1, 4, "ok")]
    # Every strategy's selected candidate is a finalist, with every seed trained to the end.
    for strategy in summary["strategies"].values():
        assert strategy["selected"]["seeds"] == 2 and strategy["selected"]["rung"] == 2
        ranked = strategy["ranking"]
        assert [c["rung"] for c in ranked] == sorted((c["rung"] for c in ranked), reverse=True)
    # Fewer runs and epochs than the paper's protocol; the counts the plan promised.
    one_run = [r for r in table.values() if r["strategy"] in strategies.ONE_RUN_METHODS]
    in_rounds = [r for r in table.values() if r["strategy"] in strategies.ROUNDS]
    searched = len(table) - len(one_run) - len(in_rounds)
    assert searched == 16 and searched < 6 * 2 * 2
    # SubTuning's rounds train the first rung (1 epoch, seed 0); its chosen, every seed.
    assert {(r["rung"], r["epochs"], r["seed"]) for r in in_rounds
            if r["status"] == "pruned"} == {(0, 1, 0)}
    assert sorted((r["rung"], r["epochs"], r["seed"]) for r in in_rounds
                  if r["status"] != "pruned") == [(2, 4, 0), (2, 4, 1)]
    # The one-run methods are baselines: every candidate trained every seed to the end.
    config = tiny.get_config().search
    assert {r["strategy"] for r in one_run} == set(ONE_RUN)
    assert len(one_run) == (len(config.gradual_epochs) + 1) * 2  # auto_rgn: one candidate
    assert all(r["status"] == "ok" and r["epochs"] == 4 and r["rung"] == 2 for r in one_run)
    assert (whole / "schedule.json").exists() and not list((whole / "parked").glob("*"))
    # One train-step compilation per engine, whatever the rungs.
    record = json.loads((whole / "runs.jsonl").read_text().splitlines()[-1])
    assert {c["train"] for c in record["compilations"].values()} == {1}
    report = (whole / "report.md").read_text()
    assert "pruned" in report


@pytest.mark.slow
def test_killed_halving_search_resumes_bitwise(whole, tmp_path):
    """kill -9 after a rung's decision (pruned rows written, runs parked), then, in the process
    that resumed there, four checkpoints later, then the same command: the same rows, summary
    and models."""
    first, second = killed_in_turn(tmp_path, HALVING, ["save:3", "save:4"], like=whole)
    assert "candidates go on" in first, first[-3000:]
    assert killed_line(first) != killed_line(second)
    assert_same_search(whole, tmp_path)
    assert Path(tmp_path / "schedule.json").read_text() == (whole / "schedule.json").read_text()
