"""results.py: ranking, summaries, per-example predictions on disk and the paired comparisons,
on synthetic workdirs (no training)."""
import types

import numpy as np
import pytest

from blockft_jax.common import statistics
from blockft_jax.search import results

CONFIG = types.SimpleNamespace(model=types.SimpleNamespace(name="mobilenet_v2"),
                               data=types.SimpleNamespace(name="digits"),
                               search=types.SimpleNamespace(block_boundaries="pooling,activation"))
LAYERS = {"classifier_only": [], "layerwise": ["block_16_project"],
          "blocks": ["block_16_project", "block_16_project_BN"],
          "topk": ["block_16_project", "block_16_expand"], "full": ["a", "b", "c", "d"]}


def fake_search(predictions_dir, accuracy: dict, *, n_val=200, n_test=150, seeds=3,
                classes=5, write=True, seed=0):
    """Rows of results.jsonl and (when `write`) the predictions behind them. `accuracy` maps a
    candidate '<strategy>' or '<strategy>:<name>' to its probability of getting an example right
    (or to an explicit (seeds, examples) bool array per split as {'validation': ..., ...})."""
    rng = np.random.default_rng(seed)
    labels = {"validation": rng.integers(0, classes, n_val),
              "test": None if n_test is None else rng.integers(0, classes, n_test)}
    if write:
        results.write_labels(predictions_dir, labels["validation"], labels["test"])
    rows = []
    for candidate, p in accuracy.items():
        strategy = candidate.split(":")[0]
        for k in range(seeds):
            predicted, row = {}, {}
            for split, y in labels.items():
                if y is None:
                    predicted[split] = None
                    continue
                right = (p[split][k] if isinstance(p, dict) else rng.random(len(y)) < p)
                predicted[split] = np.where(right, y, (y + 1) % classes)
                row[split] = float(np.mean(right))
            if write:
                results.write_predictions(predictions_dir, candidate, k, predicted["validation"],
                                          predicted["test"])
            rows.append({"strategy": strategy, "candidate": candidate,
                         "layers": LAYERS[strategy], "depth": len(LAYERS[strategy]) - 1,
                         "seed": k, "val_accuracy": row["validation"],
                         "test_accuracy": row.get("test"), "status": "ok"})
    return rows


# --- predictions on disk ----------------------------------------------------------------------

def test_predictions_round_trip(tmp_path):
    labels = np.array([0, 1, 2, 1])
    results.write_labels(tmp_path, labels, None)
    path = results.write_predictions(tmp_path, "blocks:block_16/x", 2, [0, 2, 2, 1], None)
    assert path == tmp_path / "blocks-block_16_x-seed2.npz"
    assert path == results.prediction_path(tmp_path, "blocks:block_16/x", 2)
    results.write_predictions(tmp_path, "blocks:block_16/x", 3, [1, 1, 2, 0], None)
    correct = results.load_correct(tmp_path, "blocks:block_16/x", [3, 2], "validation")
    assert correct.dtype == bool
    np.testing.assert_array_equal(correct, [[False, True, True, False],
                                            [True, False, True, True]])
    assert not results.has_split(tmp_path, "test")
    with pytest.raises(KeyError, match="no test labels"):
        results.load_correct(tmp_path, "blocks:block_16/x", [2], "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "blocks-block_16_x-seed2.npz", "blocks-block_16_x-seed3.npz", "labels.npz"]  # no temps


def test_predictions_must_be_class_indices(tmp_path):
    with pytest.raises(ValueError, match="1-D array of class indices"):
        results.write_predictions(tmp_path, "full", 0, np.zeros((4, 3)), None)


def test_predictions_from_another_split_size_are_refused(tmp_path):
    results.write_labels(tmp_path, np.arange(5) % 3, None)
    results.write_predictions(tmp_path, "full", 0, np.arange(4) % 3, None)
    with pytest.raises(results.StalePredictionsError, match="different searches"):
        results.load_correct(tmp_path, "full", [0], "validation")


# --- the paired bootstrap ---------------------------------------------------------------------

def test_identical_predictions_differ_by_exactly_zero():
    correct = np.random.default_rng(3).random((3, 100)) < 0.6
    assert statistics.interval95(statistics.paired_bootstrap(correct, correct.copy())) == [0.0, 0.0]


def test_right_everywhere_against_wrong_everywhere_is_one():
    right, wrong = np.ones((2, 50), bool), np.zeros((2, 50), bool)
    assert statistics.interval95(statistics.paired_bootstrap(right, wrong)) == [1.0, 1.0]
    assert statistics.interval95(statistics.paired_bootstrap(wrong, right)) == [-1.0, -1.0]


def test_bootstrap_matches_a_plain_loop_over_replicates():
    rng = np.random.default_rng(7)
    a, b = rng.random((3, 37)) < 0.7, rng.random((3, 37)) < 0.5
    replicates = 300
    # The reference: one replicate at a time, indexing the resampled seeds and examples.
    seed_rng, example_rng = np.random.default_rng([5, 0]), np.random.default_rng([5, 1])
    diff = a.astype(float) - b.astype(float)
    reference = []
    for _ in range(replicates):
        seeds = np.floor(seed_rng.random(3) * 3).astype(int)
        examples = np.floor(example_rng.random(37) * 37).astype(int)
        reference.append(diff[np.ix_(seeds, examples)].mean())
    got = statistics.paired_bootstrap(a, b, replicates=replicates, seed=5)
    np.testing.assert_allclose(got, reference, atol=1e-12)
    assert statistics.interval95(got) == pytest.approx(
        list(np.quantile(reference, [0.025, 0.975])), abs=1e-12)


def test_batches_of_replicates_draw_the_same_stream(monkeypatch):
    rng = np.random.default_rng(8)
    a, b = rng.random((2, 50)) < 0.6, rng.random((2, 50)) < 0.5
    whole = statistics.paired_bootstrap(a, b, replicates=40, seed=1)
    monkeypatch.setattr(statistics, "BATCH_ELEMENTS", 120)  # batches of 2 replicates
    np.testing.assert_allclose(statistics.paired_bootstrap(a, b, replicates=40, seed=1), whole,
                               atol=1e-12)


def test_bootstrap_is_reproducible_and_pairing_narrows_the_interval():
    rng = np.random.default_rng(11)
    # b is a with 8 of 400 examples flipped to wrong (per seed): the examples both get right or
    # wrong cancel; an unpaired view would see two accuracies each uncertain by ~+-0.05.
    a = rng.random((3, 400)) < 0.6
    b = a.copy()
    for k in range(3):
        b[k, np.flatnonzero(a[k])[:8]] = False
    first = statistics.interval95(statistics.paired_bootstrap(a, b))
    assert first == statistics.interval95(statistics.paired_bootstrap(a, b))
    lo, hi = first
    assert 0 < lo < 0.02 < hi < 0.04


# --- comparisons in the summary ---------------------------------------------------------------

ACCURACY = {"classifier_only": 0.55, "layerwise:block_16_project": 0.60, "layerwise:x": 0.4,
            "topk:2": 0.75, "full": 0.70}


def test_summarize_compares_the_winner_with_every_other_strategy_on_both_splits(tmp_path):
    rows = fake_search(tmp_path, ACCURACY)
    plain = results.summarize(CONFIG, rows, 2)
    summary = results.summarize(CONFIG, rows, 2, predictions_dir=tmp_path)
    # Everything summarize gave before is unchanged; four keys are added.
    assert {k: v for k, v in summary.items()
            if k not in ("comparisons", "distinguishable", "verdict", "settings")} == plain
    assert summary["settings"] == []  # one setting each: nothing to compare the winner with
    assert "comparisons" not in plain
    assert summary["winner"]["candidate"] == "topk:2"
    others = ["classifier_only", "layerwise:block_16_project", "full"]  # each strategy's choice
    assert [(c["split"], c["b"]) for c in summary["comparisons"]] == (
        [("validation", b) for b in others] + [("test", b) for b in others])
    by_key = {(r["candidate"], r["seed"]): r for r in rows}
    for c in summary["comparisons"]:
        assert c["a"] == "topk:2" and c["seeds"] == [0, 1, 2]
        key = results.ROW_ACCURACY[c["split"]]
        expected = np.mean([by_key[c["a"], s][key] - by_key[c["b"], s][key] for s in range(3)])
        assert c["difference"] == pytest.approx(expected, abs=1e-15)
        lo, hi = c["ci95"]
        assert lo <= c["difference"] <= hi
        assert c["distinguishable"] == (lo > 0 or hi < 0)
        assert c["method"] == ("paired bootstrap over examples and seeds, 2000 replicates, "
                               "percentile 95% interval")
        assert c["examples"] == (200 if c["split"] == "validation" else 150)
    # +0.20 over classifier_only with 600 example-seed pairs is far outside the noise.
    assert summary["distinguishable"] is True
    assert summary["verdict"].startswith("topk:2 beats the simplest candidate, classifier_only")


def test_summarize_without_predictions_leaves_comparisons_out(tmp_path):
    rows = fake_search(tmp_path, ACCURACY, write=False)
    assert results.summarize(CONFIG, rows, 2, predictions_dir=tmp_path) == \
        results.summarize(CONFIG, rows, 2)


def test_no_test_split_compares_on_validation_only(tmp_path):
    rows = fake_search(tmp_path, ACCURACY, n_test=None)
    assert all(r["test_accuracy"] is None for r in rows)
    summary = results.summarize(CONFIG, rows, 2, predictions_dir=tmp_path)
    assert {c["split"] for c in summary["comparisons"]} == {"validation"}
    assert len(summary["comparisons"]) == 3


def test_a_close_winner_is_not_distinguishable(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.random((3, 100)) < 0.6
    winner = base.copy()
    winner[:, np.flatnonzero(~base.any(axis=0))[:1]] = True  # one more right, on every seed
    rows = fake_search(tmp_path, {
        "classifier_only": {"validation": base, "test": base},
        "layerwise:block_16_project": {"validation": winner, "test": winner}},
        n_val=100, n_test=100)
    summary = results.summarize(CONFIG, rows, 2, predictions_dir=tmp_path)
    validation = summary["comparisons"][0]
    assert validation["difference"] == pytest.approx(0.01)
    assert validation["ci95"][0] <= 0 < validation["ci95"][1]
    assert validation["distinguishable"] is False
    assert summary["distinguishable"] is False
    assert "not distinguishable from the simplest candidate, classifier_only" in \
        summary["verdict"]


def test_when_the_simplest_wins_it_is_judged_against_the_runner_up(tmp_path):
    rows = fake_search(tmp_path, {"classifier_only": 0.8, "layerwise:block_16_project": 0.78,
                                  "full": 0.3})
    summary = results.summarize(CONFIG, rows, 2, predictions_dir=tmp_path)
    assert summary["winner"]["candidate"] == "classifier_only"
    runner_up = next(c for c in summary["comparisons"]
                     if c["split"] == "validation" and c["b"] == "layerwise:block_16_project")
    assert summary["distinguishable"] == runner_up["distinguishable"]
    assert "runner-up layerwise:block_16_project" in summary["verdict"]


def test_without_classifier_only_the_fewest_layers_are_the_simplest(tmp_path):
    rows = fake_search(tmp_path, {"layerwise:block_16_project": 0.5, "full": 0.9}, seeds=2)
    summary = results.summarize(CONFIG, rows, 2, predictions_dir=tmp_path)
    assert "simplest candidate, layerwise:block_16_project" in summary["verdict"]
    assert summary["distinguishable"] is True


def test_stale_predictions_are_refused(tmp_path):
    rows = fake_search(tmp_path, ACCURACY)
    # Another run of layerwise:block_16_project seed 1 overwrote its file: one more right.
    labels = np.load(results.labels_path(tmp_path))["validation"]
    path = results.prediction_path(tmp_path, "layerwise:block_16_project", 1)
    with np.load(path) as f:
        validation, test = f["validation"], f["test"]
    wrong = np.flatnonzero(validation != labels)[0]
    validation = validation.copy()
    validation[wrong] = labels[wrong]
    results.write_predictions(tmp_path, "layerwise:block_16_project", 1, validation, test)
    with pytest.raises(results.StalePredictionsError,
                       match="layerwise-block_16_project-seed1.npz gives validation accuracy"):
        results.summarize(CONFIG, rows, 2, predictions_dir=tmp_path)


def test_only_seeds_both_candidates_have_are_compared(tmp_path):
    rows = fake_search(tmp_path, {"classifier_only": 0.5, "full": 0.7})
    rows = [r for r in rows if not (r["candidate"] == "classifier_only" and r["seed"] == 2)]
    c = results.compare(rows, "full", "classifier_only", "validation", tmp_path)
    assert c["seeds"] == [0, 1]
    runs = {(r["candidate"], r["seed"]): r["val_accuracy"] for r in rows}
    assert c["difference"] == pytest.approx(
        np.mean([runs["full", s] - runs["classifier_only", s] for s in (0, 1)]))


# --- how much more data -----------------------------------------------------------------------

def test_firmer_answer_scales_like_one_over_sqrt_examples():
    comparison = {"difference": 0.02, "ci95": [-0.01, 0.05], "distinguishable": False,
                  "examples": 300, "seeds": [0, 1, 2]}
    firmer = results.firmer_answer(comparison)
    assert firmer["half_width"] == pytest.approx(0.03)
    assert firmer["examples_to_halve"] == 1200
    # Half-width 0.03 at 300 examples falls to 0.02 at 300 * (0.03 / 0.02)**2 = 675.
    assert firmer["examples_to_exclude_zero"] == 675
    assert results.firmer_answer(dict(comparison, distinguishable=True))[
        "examples_to_exclude_zero"] is None
    assert results.examples_needed(0.03, 300, 0.0) is None
