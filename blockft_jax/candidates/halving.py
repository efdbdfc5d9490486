"""Which runs train how long: the paper's exhaustive protocol, or successive halving.

`exhaustive`: every candidate trains `train.epochs` epochs for each of `train.seeds` seeds.

`halving` (successive halving, as in Hyperband/ASHA): rungs of growing budgets, E / eta^n, ...,
E / eta, E epochs (E = train.epochs; rounded, at least 1), but none shorter than
`search.min_rung_steps` optimizer steps (a few steps rank noise). At every rung but the last,
each pool's surviving candidates train (with `search.halving_seeds` seeds) up to the rung's
epochs; then the best 1/eta of them (rounded up, at least one) by mean validation accuracy at
their best epoch so far go on from where they stopped -- no epoch is trained twice -- and the
others are pruned (their runs are recorded as they stand). A pool is what competes: all of a
searched strategy's (layers, setting) candidates, or one baseline candidate's settings. With
`search.prune_only_on_evidence`, a candidate is pruned only when the rung can tell it apart
(`evidence`): the others go on too. A pool whose candidates would all survive a rung does not
stop there. At the last rung the finalists train every seed to E epochs (the seeds not trained
before from the start), so the summary, the paired comparisons and the saved models rest on the
same runs as in an exhaustive search. Ties keep plan order (the candidate nearer the output
first).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from blockft_jax.common import statistics

SCHEDULES = ("exhaustive", "halving")


@dataclasses.dataclass(frozen=True)
class Rung:
    epochs: int
    seeds: tuple[int, ...]
    final: bool


def rungs(schedule: str, epochs: int, seeds: int, eta: int = 3, halving_seeds: int = 1, *,
          min_steps: int = 1, steps_per_epoch: int | None = None) -> list[Rung]:
    """The rungs of a schedule, lowest budget first; the last trains every seed to `epochs`.
    An early rung of fewer than `min_steps` optimizer steps (`steps_per_epoch` known) is
    dropped."""
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
    if steps_per_epoch is not None:
        budgets = [b for b in budgets if b * steps_per_epoch >= min_steps]
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


def chance_bound(classes: int, examples: int) -> float:
    """The accuracy a model that guesses reaches by luck (chance plus two of its standard
    errors on `examples`): a leader below it has learnt nothing the rung can rank."""
    p = 1.0 / max(classes, 1)
    return p + 2.0 * math.sqrt(p * (1 - p) / max(examples, 1))


def evidence(order: Sequence[str], accuracy: dict[str, float], correct: dict[str, np.ndarray],
             eta: int, chance: float) -> dict:
    """A rung's decision on evidence: of `promote`'s pruned, only those the paired bootstrap on
    validation (`correct`: (seeds, examples) per candidate, the rung's runs) puts below the
    leader (the interval of leader minus it above 0) go; the others are held (they go on).
    Nothing goes while the leader's accuracy is within `chance` (chance_bound).
    Returns {'kept': [...] in plan order, 'pruned': {candidate: {'difference', 'ci95'}},
    'held': {candidate: {...}} (kept for lack of evidence), 'leader', 'within_chance'}."""
    promoted = promote(order, accuracy, eta)
    leader = max(order, key=lambda c: (accuracy[c], -order.index(c)))
    within = accuracy[leader] <= chance
    pruned, held = {}, {}
    for c in order:
        if c in promoted:
            continue
        difference = accuracy[leader] - accuracy[c]
        ci95 = statistics.interval95(statistics.paired_bootstrap(correct[leader], correct[c]))
        entry = {"difference": difference, "ci95": ci95}
        (held if within or ci95[0] <= 0 else pruned)[c] = entry
    return {"kept": [c for c in order if c not in pruned], "pruned": pruned, "held": held,
            "leader": leader, "within_chance": bool(within)}


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
