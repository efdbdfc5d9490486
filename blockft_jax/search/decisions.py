"""The halving search's state in one place: which candidates of each pool go on at each rung,
and which candidate each round of a search in rounds chose.

Each decision is made once, on process 0, from the runs as they stand (`ledger.Ledger`), sent
to every process and kept in schedule.json: a rerun after an interruption finds the same
decisions and walks the same rungs and rounds.
"""
from __future__ import annotations

import json
import logging

import numpy as np

from blockft_jax.candidates import halving, subtuning
from blockft_jax.candidates.groups import Group
from blockft_jax.common import multihost
from blockft_jax.common.progress import Progress
from blockft_jax.common.workdir import Workdir
from blockft_jax.search.ledger import Ledger

log = logging.getLogger(__name__)

DECISIONS = "schedule.json"


def round_pool(strategy: str, index: int) -> str:
    """A round's name in schedule.json (a pool of one rung)."""
    return f"{strategy} round {index}"


class Decisions:
    """{pool: {rung index: decision}} as schedule.json keeps it; a round is a pool of one rung
    (`round_pool`)."""

    def __init__(self, config, plan, ledger: Ledger, progress: Progress, wd: Workdir,
                 class_count: int, validation_labels: np.ndarray):
        self.config, self.plan, self.ledger, self.progress, self.wd = (
            config, plan, ledger, progress, wd)
        self.class_count, self.labels = class_count, validation_labels
        path = wd.path / DECISIONS
        self.entries: dict = multihost.broadcast_json(
            lambda: json.loads(path.read_text()) if path.exists() else {})

    def alive(self, pool: str, members: list[Group], rung: int) -> list[Group]:
        """The candidates of a pool (plan.pools) still searched at rung `rung` (decisions
        before it)."""
        alive = members
        for index, entry in sorted((int(i), e) for i, e in self.entries.get(pool, {}).items()):
            if index < rung:
                alive = [g for g in alive if g.candidate in entry["kept"]]
        return alive

    def decide(self, pool: str, members: list[Group], rung: int) -> list[Group]:
        """At a rung where a pool stops (not the last), its best 1/eta candidates by mean
        validation accuracy (best epoch so far) over the rung's seeds go on, and with
        search.prune_only_on_evidence those the rung cannot tell apart from its leader too
        (halving.evidence); the others' runs are recorded, pruned. Returns the pruned
        candidates."""
        alive = self.alive(pool, members, rung)
        seeds = self.plan.rungs[rung].seeds
        ledger = self.ledger

        def decide() -> dict:
            names = [g.candidate for g in alive]
            accuracy = ledger.mean_accuracy(alive, seeds)
            if not self.config.search.prune_only_on_evidence:
                kept = halving.promote(names, accuracy, self.plan.eta)
                leader = max(kept, key=accuracy.get)
                return {"kept": kept, "leader": leader, "within_chance": False, "held": {},
                        "pruned": {n: {"difference": accuracy[leader] - accuracy[n]}
                                   for n in names if n not in kept}}
            correct = {g.candidate: np.stack([ledger.standing(g.candidate, seed)[1] == self.labels
                                              for seed in seeds]) for g in alive}
            chance = halving.chance_bound(self.class_count, len(self.labels))
            return halving.evidence(names, accuracy, correct, self.plan.eta, chance)

        entry = self._keep(pool, rung, decide)
        planned = halving.survivors(len(alive), self.plan.eta)
        kept = entry["kept"]
        pruned = [g for g in alive if g.candidate not in kept]
        closest = min(entry["pruned"].items(), key=lambda kv: kv[1]["difference"], default=None)
        log.info("%s, rung %d (%d epochs): %d of %d candidates go on (%s)%s%s", pool, rung,
                 self.plan.rungs[rung].epochs, len(kept), len(alive),
                 ", ".join(kept[:4]) + (" ..." if len(kept) > 4 else ""),
                 f"; the closest pruned, {closest[0]}, trails {entry['leader']} by "
                 f"{closest[1]['difference']:.3f}" if closest else "",
                 f"; {len(entry['held'])} kept for lack of evidence"
                 f"{' (the leader is within chance)' if entry['within_chance'] else ''}"
                 if entry["held"] else "")
        # A rung that holds candidates trains more than the plan counted.
        rest = self.plan.rungs[rung + 1:]
        self.progress.total += (halving.expected(len(kept), rest, self.plan.eta)[0]
                                - halving.expected(planned, rest, self.plan.eta)[0]
                                - len(entry["held"]) * len(seeds))
        ledger.record_pruned(pruned, seeds, self.progress.finished)
        return pruned

    def decide_round(self, strategy: str, index: int, members: list[Group], previous,
                     budget: halving.Rung, last: bool) -> dict:
        """Round `index` of a strategy in rounds (subtuning.decide, from its candidates' mean
        validation over the round's seeds), its pruned runs recorded. `previous`: (candidate,
        units, accuracy) chosen before, None in round 1. Returns the decision."""
        entry = self._keep(round_pool(strategy, index), 0, lambda: subtuning.decide(
            index, members, self.ledger.mean_accuracy(members, budget.seeds), previous,
            self.config.search.subtuning_epsilon, last))
        log.info("%s, round %d (%d candidates, %d epochs): %s%s", strategy, index, len(members),
                 budget.epochs, f"adds {entry['added']} ({entry['chosen']}" if entry["added"]
                 else f"adds nothing ({entry['leader']}",
                 f", validation {entry['accuracy'][entry['leader']]:.3f}, a gain of "
                 f"{entry['gain']:+.3f}); " + ("the search in rounds stops" if entry["stop"]
                                              else "the next round goes on from it"))
        self.ledger.record_pruned([g for g in self.plan.planned[strategy]
                                   if g.candidate in entry["pruned"]], budget.seeds,
                                  self.progress.finished)
        return entry

    def _keep(self, pool: str, rung: int, make) -> dict:
        """A pool's decision at rung `rung`: the one kept in schedule.json, else process 0's
        `make()`; the same on every process, and kept there."""
        def decide() -> dict:
            kept = self.entries.get(pool, {}).get(str(rung))
            return make() if kept is None else kept

        entry = multihost.broadcast_json(decide)
        self.entries.setdefault(pool, {})[str(rung)] = entry
        self.wd.write_json(DECISIONS, self.entries)
        return entry

    def rounds(self, strategy: str, budget: halving.Rung) -> list[dict]:
        """The decisions of a strategy in rounds, round 1 first, with the rounds' budget."""
        entries = []
        while round_pool(strategy, len(entries) + 1) in self.entries:
            entries.append({**self.entries[round_pool(strategy, len(entries) + 1)]["0"],
                            "epochs": budget.epochs, "seeds": len(budget.seeds)})
        return entries

    def of_rungs(self, in_rounds: set[str]) -> dict:
        """The rungs' decisions, the rounds' (pools named in `in_rounds`) left out."""
        return {pool: d for pool, d in self.entries.items() if pool not in in_rounds}
