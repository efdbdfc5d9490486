"""What a search's results say: candidates ranked over seeds, the summary of a search, and
whether the winner is really better than the alternatives.

Everything here is computed from the workdir (the rows of results.jsonl, one per candidate and
seed, and the per-example predictions under predictions/), so a summary can be rebuilt at any
time.

Predictions on disk (written by the search, read here):
  predictions/<slug>-seed<k>.npz   int arrays `validation` and `test` (the latter absent when the
                                   search has no test split): the class each example was given,
                                   in split order, by that run at its best epoch
  predictions/labels.npz           the `validation` and `test` labels, once per search
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from blockft_jax.candidates import settings
from blockft_jax.candidates.strategies import SEARCH_ORDER, labels
from blockft_jax.common import durable
from blockft_jax.common.statistics import BOOTSTRAP_SEED, REPLICATES, interval95, paired_bootstrap

log = logging.getLogger(__name__)

PREDICTIONS_DIR = "predictions"  # under the workdir
SPLITS = ("validation", "test")
ROW_ACCURACY = {"validation": "val_accuracy", "test": "test_accuracy"}
METHOD = "paired bootstrap over examples and seeds, {} replicates, percentile 95% interval"
# Predictions and results rows come from the same counts; anything more is a stale file.
CONSISTENCY_TOLERANCE = 1e-9


def rank(rows: list[dict]) -> list[dict]:
    """Candidates by mean validation accuracy over seeds (best first), those that reached a
    later rung of a halving search before those pruned earlier, and those never pruned before
    the pruned (only the last rung's finalists can be selected: a SubTuning round's pruned
    runs may stand at the last rung's index when there is one rung); ties keep search order."""
    by_candidate: dict[str, list[dict]] = {}
    for r in rows:
        by_candidate.setdefault(r["candidate"], []).append(r)
    ranked = []
    for candidate, rs in by_candidate.items():
        val = [r["val_accuracy"] for r in rs]
        test = [r["test_accuracy"] for r in rs if r.get("test_accuracy") is not None]
        ranked.append({"candidate": candidate, "strategy": rs[0]["strategy"],
                       "layers": rs[0]["layers"], "depth": rs[0]["depth"], "seeds": len(rs),
                       "bn_policy": rs[0].get("bn_policy", "train"),
                       "lr_factor": rs[0].get("lr_factor", 1.0),
                       "val_accuracy": _mean_std(val), "test_accuracy": _mean_std(test),
                       "diverged": sum(r["status"] == "diverged" for r in rs),
                       "rung": max(r.get("rung", 0) for r in rs),
                       "epochs": max((r["epochs"] for r in rs if "epochs" in r), default=None),
                       "pruned": any(r["status"] == "pruned" for r in rs)})
    order = {c: i for i, c in enumerate(by_candidate)}
    ranked.sort(key=lambda c: (-c["rung"], c["pruned"], -c["val_accuracy"]["mean"],
                               order[c["candidate"]]))
    return ranked


def _mean_std(values):
    if not values:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def summarize(config, rows: list[dict], train_step_compilations: int,
              predictions_dir=None) -> dict:
    """The search's summary. With a `predictions_dir` holding the search's predictions it also
    has `comparisons` (the winner against every other strategy's selected candidate, paired
    95% intervals, on validation and test), `distinguishable` and a `verdict` sentence."""
    strategies = {}
    for strategy in SEARCH_ORDER:
        ranked = rank([r for r in rows if r["strategy"] == strategy])
        if ranked:
            strategies[strategy] = {"selected": ranked[0], "ranking": ranked}
    winner = max((s["selected"] for s in strategies.values()),
                 key=lambda c: c["val_accuracy"]["mean"])
    summary = {"model": config.model.name, "dataset": config.data.name,
               "selection": "mean validation accuracy over seeds (of the candidates that reached "
                            "the last rung); test accuracy is for the record",
               "strategies": strategies, "winner": winner,
               "labels": labels(config, strategies),
               "train_step_compilations": train_step_compilations}
    if predictions_dir is not None and labels_path(predictions_dir).exists():
        summary["comparisons"] = compare_winner(rows, strategies, winner, predictions_dir)
        summary["distinguishable"], summary["verdict"] = verdict(
            summary["comparisons"], strategies, winner)
        summary["settings"] = compare_settings(rows, winner, predictions_dir)
    return summary


# --- per-example predictions on disk ----------------------------------------------------------

def slug(candidate: str) -> str:
    """A candidate's name as a file name (the same as the search's tensorboard run names)."""
    return candidate.replace(":", "-").replace("/", "_")


def prediction_path(predictions_dir, candidate: str, seed: int) -> Path:
    return Path(predictions_dir) / f"{slug(candidate)}-seed{seed}.npz"


def labels_path(predictions_dir) -> Path:
    return Path(predictions_dir) / "labels.npz"


def write_predictions(predictions_dir, candidate: str, seed: int, validation,
                      test=None) -> Path:
    """The class each example got from one run (candidate, seed) at its best epoch, in split
    order; `test` is None when the search has no test split."""
    path = prediction_path(predictions_dir, candidate, seed)
    _save_npz_atomic(path, _class_arrays(validation=validation, test=test))
    return path


def write_labels(predictions_dir, validation, test=None) -> Path:
    path = labels_path(predictions_dir)
    _save_npz_atomic(path, _class_arrays(validation=validation, test=test))
    return path


def _class_arrays(**arrays) -> dict:
    out = {}
    for name, values in arrays.items():
        if values is None:
            continue
        values = np.asarray(values)
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name}: expected a 1-D array of class indices, got "
                             f"{values.dtype} of shape {values.shape}.")
        out[name] = values.astype(np.int32)
    return out


def _save_npz_atomic(path: Path, arrays: dict) -> None:
    durable.write(path, lambda f: np.savez(f, **arrays))


def _load(path: Path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def has_split(predictions_dir, split: str) -> bool:
    """Whether the search had this split (its labels were written)."""
    path = labels_path(predictions_dir)
    return path.exists() and split in _load(path)


def load_correct(predictions_dir, candidate: str, seeds, split: str) -> np.ndarray:
    """(seeds, examples) bool: whether run (candidate, seed) got each example of `split` right."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}.")
    labels = _load(labels_path(predictions_dir))
    if split not in labels:
        raise KeyError(f"{labels_path(predictions_dir)} has no {split} labels: the search had "
                       f"no {split} split.")
    correct = []
    for seed in seeds:
        path = prediction_path(predictions_dir, candidate, seed)
        predicted = _load(path)
        if split not in predicted:
            raise KeyError(f"{path} has no {split} predictions.")
        if predicted[split].shape != labels[split].shape:
            raise StalePredictionsError(
                f"{path} has {predicted[split].shape[0]} {split} predictions but "
                f"{labels_path(predictions_dir)} has {labels[split].shape[0]} labels: the files "
                f"come from different searches.")
        correct.append(predicted[split] == labels[split])
    return np.stack(correct) if correct else np.zeros((0, labels[split].shape[0]), bool)


class StalePredictionsError(ValueError):
    """Predictions on disk that do not give the accuracies results.jsonl records."""


# --- paired comparisons -----------------------------------------------------------------------

def compare(rows: list[dict], a: str, b: str, split: str, predictions_dir, *,
            replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED) -> dict | None:
    """Candidate a against candidate b on one split, over the seeds both have (with a recorded
    accuracy and a predictions file). None when they share no such seed."""
    key = ROW_ACCURACY[split]
    runs = {}
    for name in (a, b):
        runs[name] = {r["seed"]: r for r in rows if r["candidate"] == name
                      and r.get(key) is not None}
    shared = sorted(set(runs[a]) & set(runs[b]))
    seeds = [s for s in shared if prediction_path(predictions_dir, a, s).exists()
             and prediction_path(predictions_dir, b, s).exists()]
    if len(seeds) < len(shared):
        log.warning("%s vs %s on %s: no predictions for seeds %s (runs from before predictions "
                    "were kept?); compared over seeds %s", a, b, split,
                    sorted(set(shared) - set(seeds)), seeds)
    if not seeds:
        return None
    correct = {}
    for name in (a, b):
        correct[name] = load_correct(predictions_dir, name, seeds, split)
        _check_consistent(correct[name], [runs[name][s] for s in seeds], name, split,
                          predictions_dir)
    # The difference is the one results.jsonl gives (checked equal to the predictions' above).
    difference = float(np.mean([runs[a][s][key] - runs[b][s][key] for s in seeds]))
    ci95 = interval95(paired_bootstrap(correct[a], correct[b], replicates=replicates, seed=seed))
    return {"a": a, "b": b, "split": split, "difference": difference, "ci95": ci95,
            "distinguishable": bool(ci95[0] > 0 or ci95[1] < 0),
            "seeds": seeds, "examples": int(correct[a].shape[1]),
            "method": METHOD.format(replicates)}


def _check_consistent(correct: np.ndarray, rows: list[dict], candidate: str, split: str,
                      predictions_dir) -> None:
    key = ROW_ACCURACY[split]
    for row, per_example in zip(rows, correct):
        if abs(per_example.mean() - row[key]) > CONSISTENCY_TOLERANCE:
            path = prediction_path(predictions_dir, candidate, row["seed"])
            raise StalePredictionsError(
                f"{path} gives {split} accuracy {per_example.mean():.6f} but results.jsonl "
                f"records {row[key]:.6f} for {candidate} seed {row['seed']}: the predictions "
                f"are stale (from another run of this candidate). Remove {predictions_dir} and "
                f"rerun those candidates, or summarize without predictions.")


def compare_winner(rows: list[dict], strategies: dict, winner: dict, predictions_dir, *,
                   replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """The winner against every other strategy's selected candidate: validation (the split that
    chooses) first, then test (for the record) when the search has one."""
    others = [s["selected"]["candidate"] for s in strategies.values()
              if s["selected"]["candidate"] != winner["candidate"]]
    out = []
    for split in SPLITS:
        if not has_split(predictions_dir, split):
            continue
        for other in others:
            c = compare(rows, winner["candidate"], other, split, predictions_dir,
                        replicates=replicates, seed=seed)
            if c is not None:
                out.append(c)
    return out


def compare_settings(rows: list[dict], winner: dict, predictions_dir, *,
                     replicates: int = REPLICATES, seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """The winner against its own layers under each other setting (what the setting did), on
    validation then test, over the seeds both have (a setting pruned at an early rung: its
    early seeds, at the epochs it trained). Each carries the other's setting and, when pruned,
    its epochs."""
    ranked = {c["candidate"]: c for c in rank(rows)}
    same = [c for name, c in ranked.items() if name != winner["candidate"]
            and settings.base(name) == settings.base(winner["candidate"])]
    out = []
    for split in SPLITS:
        if not has_split(predictions_dir, split):
            continue
        for other in same:
            c = compare(rows, winner["candidate"], other["candidate"], split, predictions_dir,
                        replicates=replicates, seed=seed)
            if c is not None:
                out.append({**c, "a_setting": {k: winner[k] for k in ("bn_policy", "lr_factor")},
                            "b_setting": {k: other[k] for k in ("bn_policy", "lr_factor")},
                            "b_pruned_after": other["epochs"] if other["pruned"] else None})
    return out


def simplest(strategies: dict) -> dict:
    """The simplest selected candidate: the fewest trained layers (classifier-only's none),
    ties in search order."""
    return min((s["selected"] for s in strategies.values()), key=lambda c: len(c["layers"]))


def verdict(comparisons: list[dict], strategies: dict, winner: dict) -> tuple[bool, str]:
    """(distinguishable, sentence): is the winner, on validation, clearly better than the
    simplest candidate? When the winner is the simplest, the question becomes whether it is
    clearly better than the runner-up (the best other strategy's choice)."""
    on_validation = {c["b"]: c for c in comparisons if c["split"] == "validation"}
    base = simplest(strategies)
    w = winner["candidate"]
    if base["candidate"] != w:
        c = on_validation.get(base["candidate"])
        if c is None:
            return False, f"No paired comparison of {w} with {base['candidate']}: not established."
        if c["distinguishable"]:
            return True, (f"{w} beats the simplest candidate, {c['b']}, on validation: "
                          f"{_interval_words(c)}, a difference larger than the noise.")
        return False, (f"{w} is not distinguishable from the simplest candidate, {c['b']}, on "
                       f"validation: {_interval_words(c)}. The search has not shown that "
                       f"fine-tuning more than {c['b']} helps.")
    if not on_validation:
        return False, f"{w} is the only strategy's choice: nothing to compare it with."
    runner_up = max((s["selected"] for s in strategies.values() if s["selected"]["candidate"] != w
                     and s["selected"]["candidate"] in on_validation),
                    key=lambda s: s["val_accuracy"]["mean"])
    c = on_validation[runner_up["candidate"]]
    if c["distinguishable"]:
        return True, (f"The simplest candidate, {w}, wins, clearly ahead of the runner-up "
                      f"{c['b']} on validation: {_interval_words(c)}.")
    return False, (f"The simplest candidate, {w}, wins, but is not distinguishable from the "
                   f"runner-up {c['b']} on validation: {_interval_words(c)}.")


def _interval_words(c: dict) -> str:
    lo, hi = c["ci95"]
    return f"{c['difference']:+.3f}, 95% interval {lo:+.3f} to {hi:+.3f}"


# --- how much more data a firmer answer needs -------------------------------------------------

def examples_needed(half_width: float, examples: int, target_half_width: float) -> int | None:
    """Examples for an interval of `target_half_width`, from one of `half_width` on `examples`,
    if the interval shrinks like 1/sqrt(examples): halving it takes ~4x. None when the target is
    0 (no finite number suffices)."""
    if target_half_width <= 0:
        return None
    return math.ceil(examples * (half_width / target_half_width) ** 2)


def firmer_answer(comparison: dict) -> dict:
    """For one comparison: its half-width, the examples that would halve it, and (when the
    interval holds 0 and the difference is not 0) the examples at which it would exclude 0 if
    the difference held. An estimate: the part of the interval that comes from training
    randomness shrinks with more seeds, not more examples."""
    lo, hi = comparison["ci95"]
    half_width = (hi - lo) / 2
    n, d = comparison["examples"], abs(comparison["difference"])
    to_exclude_zero = None
    if not comparison["distinguishable"] and d > 0:
        to_exclude_zero = examples_needed(half_width, n, d)
    return {"half_width": half_width, "examples": n, "seeds": len(comparison["seeds"]),
            "examples_to_halve": examples_needed(half_width, n, half_width / 2),
            "examples_to_exclude_zero": to_exclude_zero}
