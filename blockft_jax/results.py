"""What a search's results say: candidates ranked over seeds, and the summary of a search.

Everything here is computed from the rows of results.jsonl (one per candidate and seed), so a
summary can be rebuilt from a workdir at any time.
"""
from __future__ import annotations

import numpy as np

from blockft_jax.groups import SEARCH_ORDER


def rank(rows: list[dict]) -> list[dict]:
    """Candidates by mean validation accuracy over seeds (best first); ties keep search order."""
    by_candidate: dict[str, list[dict]] = {}
    for r in rows:
        by_candidate.setdefault(r["candidate"], []).append(r)
    ranked = []
    for candidate, rs in by_candidate.items():
        val = [r["val_accuracy"] for r in rs]
        test = [r["test_accuracy"] for r in rs if r.get("test_accuracy") is not None]
        ranked.append({"candidate": candidate, "strategy": rs[0]["strategy"],
                       "layers": rs[0]["layers"], "depth": rs[0]["depth"], "seeds": len(rs),
                       "val_accuracy": _mean_std(val), "test_accuracy": _mean_std(test),
                       "diverged": sum(r["status"] == "diverged" for r in rs)})
    order = {c: i for i, c in enumerate(by_candidate)}
    ranked.sort(key=lambda c: (-c["val_accuracy"]["mean"], order[c["candidate"]]))
    return ranked


def _mean_std(values):
    if not values:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def summarize(config, rows: list[dict], train_step_compilations: int) -> dict:
    strategies = {}
    for strategy in SEARCH_ORDER:
        ranked = rank([r for r in rows if r["strategy"] == strategy])
        if ranked:
            strategies[strategy] = {"selected": ranked[0], "ranking": ranked}
    winner = max((s["selected"] for s in strategies.values()),
                 key=lambda c: c["val_accuracy"]["mean"])
    return {"model": config.model.name, "dataset": config.data.name,
            "selection": "mean validation accuracy over seeds; test accuracy is for the record",
            "strategies": strategies, "winner": winner,
            "train_step_compilations": train_step_compilations}
