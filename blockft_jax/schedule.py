"""Which runs train how long: the paper's exhaustive protocol, or successive halving.

`exhaustive`: every candidate trains `train.epochs` epochs for each of `train.seeds` seeds.

`halving` (successive halving, as in Hyperband/ASHA): rungs of growing budgets, E / eta^n, ...,
E / eta, E epochs (E = train.epochs; rounded, at least 1). At every rung but the last, each
strategy's surviving candidates train (with `search.halving_seeds` seeds) up to the rung's
epochs; then the best 1/eta of them (rounded up, at least one) by mean validation accuracy at
their best epoch so far go on from where they stopped -- no epoch is trained twice -- and the
others are pruned (their runs are recorded as they stand). A strategy whose candidates would
all survive a rung does not stop there. At the last rung the finalists train every seed to E
epochs (the seeds not trained before from the start), so the summary, the paired comparisons
and the saved models rest on the same runs as in an exhaustive search. Ties keep plan order
(the candidate nearer the output first).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

SCHEDULES = ("exhaustive", "halving")


@dataclasses.dataclass(frozen=True)
class Rung:
    epochs: int
    seeds: tuple[int, ...]
    final: bool


def rungs(schedule: str, epochs: int, seeds: int, eta: int = 3,
          halving_seeds: int = 1) -> list[Rung]:
    """The rungs of a schedule, lowest budget first; the last trains every seed to `epochs`."""
    final = Rung(epochs, tuple(range(seeds)), True)
    if schedule == "exhaustive":
        return [final]
    if schedule != "halving":
        raise ValueError(f"schedule={schedule!r}: use one of {SCHEDULES}.")
    budgets = []
    n = 1
    while epochs / eta ** n >= 1:
        budgets.append(max(1, round(epochs / eta ** n)))
        n += 1
    early = tuple(range(min(halving_seeds, seeds)))
    return [Rung(b, early, False) for b in sorted(set(budgets)) if b < epochs] + [final]


def survivors(candidates: int, eta: int) -> int:
    """How many of `candidates` go on from a rung: the best 1/eta, rounded up."""
    return max(1, math.ceil(candidates / eta))


def promote(order: Sequence[str], accuracy: dict[str, float], eta: int) -> list[str]:
    """The candidates that go on: the best `survivors` of `order` (plan order: nearer the
    output first) by `accuracy` (mean validation accuracy at the rung), ties in plan order."""
    ranked = sorted(order, key=lambda c: (-accuracy[c], order.index(c)))
    kept = set(ranked[:survivors(len(order), eta)])
    return [c for c in order if c in kept]


def stops(candidates: int, rung: Rung, eta: int) -> bool:
    """Whether a strategy with `candidates` alive stops at `rung`: the last rung, or one where
    some would be pruned."""
    return rung.final or survivors(candidates, eta) < candidates


def stopping_rungs(candidates: int, rungs: Sequence[Rung], eta: int) -> list[int]:
    """The indices of the rungs where a strategy of `candidates` stops (the last one always)."""
    alive, stopping = candidates, []
    for i, rung in enumerate(rungs):
        if stops(alive, rung, eta):
            stopping.append(i)
            if not rung.final:
                alive = survivors(alive, eta)
    return stopping


def expected(candidates: int, rungs: Sequence[Rung], eta: int) -> tuple[int, int]:
    """(runs recorded, epochs trained over all runs) of a strategy of `candidates`."""
    alive, trained, runs, epochs = candidates, 0, 0, 0
    early = 0
    for i in stopping_rungs(candidates, rungs, eta):
        rung = rungs[i]
        if rung.final:
            resumed = min(early, len(rung.seeds))  # seeds that trained at earlier rungs
            epochs += alive * (resumed * (rung.epochs - trained) +
                               (len(rung.seeds) - resumed) * rung.epochs)
            runs += alive * len(rung.seeds)
        else:
            early = len(rung.seeds)
            epochs += alive * early * (rung.epochs - trained)
            trained = rung.epochs
            kept = survivors(alive, eta)
            runs += (alive - kept) * early
            alive = kept
    return runs, epochs
