"""SubTuning (Kaplun et al. 2023, "Less is More: Selective Layer Finetuning with SubTuning"):
greedy selection of the units (blocks) that fine-tune, in rounds.

Round 1 trains the head alone and each unit with the head; every later round trains the units
chosen so far plus one more unit, each unit not yet chosen. Each round's candidates train a
short budget (`round_rung`) with the early seeds; a round's leader (the best mean validation
accuracy at its best epoch) is chosen when it gains at least `search.subtuning_epsilon` over
the candidate chosen before it (round 1: the head alone), and the search stops at the first
round that gains less, when no unit is left, or after `search.subtuning_rounds` rounds. The
chosen candidate then trains every seed to train.epochs (its early seeds go on from where they
stopped), as a halving finalist does. Every other candidate's runs are recorded, pruned.

As in the reference code, units not chosen run their BatchNorm in inference mode and chosen
ones in train mode (our `bn_policy='train'`); the settings of the search (BN policy,
learning-rate factor) are searched with the units here as for every strategy, and the reference
starts from the head alone with epsilon 0.01 (its default), as we do. Where we differ: the
rounds train halving's first rung (one seed), not a fixed number of epochs, and a round's
leader may carry any setting.
"""
from __future__ import annotations

from typing import Sequence

from blockft_jax.candidates import groups, halving
from blockft_jax.candidates.groups import Group

HEAD = "subtuning:head"
STRATEGY = "subtuning"


def units_in_reach(table, reach: int | None) -> list[str]:
    """The units SubTuning may choose: the weighted units from the top, `reach` of them (None:
    every one)."""
    return groups.weighted_units(table)[:reach]


def reach_of(config) -> int | None:
    """How many units from the top SubTuning may choose (None: every one)."""
    return config.search.subtuning_units or None


def rounds_allowed(config, table) -> int:
    """search.subtuning_rounds (0: no limit), at most one round per unit in reach."""
    units = len(units_in_reach(table, reach_of(config)))
    return min(config.search.subtuning_rounds or units, units)


def planned_choices(config, table) -> list[tuple[str, ...] | None]:
    """The units chosen before each round, as planned (for estimates): every round allowed
    run, each adding the next unit from the top."""
    order = units_in_reach(table, reach_of(config))
    return [tuple(order[:r]) or None for r in range(rounds_allowed(config, table))]


def words(config) -> str:
    """The dry run's words for the rounds."""
    s = config.search
    units = f"of the top {s.subtuning_units}" if s.subtuning_units else "every unit"
    return (f"in rounds: the units chosen so far plus each other unit ({units}), trained "
            f"halving's first rung with its seeds; a round adds its best unit while it gains >= "
            f"{s.subtuning_epsilon:g} (at most {s.subtuning_rounds or 'all'} rounds); the chosen "
            f"units train every seed")


def candidate_name(units: Sequence[str]) -> str:
    return f"{STRATEGY}:" + "+".join(units) if units else HEAD


def round_groups(table, chosen: Sequence[str] | None, reach: int | None) -> list[Group]:
    """A round's candidates before settings: after `chosen` (None: the first round, which
    trains the head alone too), the chosen units plus each unit in reach not chosen yet. A
    group's `option` is its units, top first."""
    order = units_in_reach(table, reach)
    chosen = tuple(chosen or ())
    first = [Group(STRATEGY, HEAD, (), ())] if not chosen else []
    out = []
    for unit in order:
        if unit in chosen:
            continue
        units = tuple(u for u in order if u in chosen or u == unit)
        out.append(Group(STRATEGY, candidate_name(units), groups.unit_layers(table, units),
                         units))
    return first + out


def round_rung(rungs: Sequence[halving.Rung], epochs: int, eta: int,
               halving_seeds: int) -> halving.Rung:
    """The budget of every round: halving's first rung when it is below the last; else
    (exhaustive, or a halving with no early rung) epochs / eta, at most epochs - 1, with the
    early seeds."""
    if len(rungs) > 1:
        return rungs[0]
    seeds = tuple(range(min(halving_seeds, len(rungs[-1].seeds))))
    return halving.Rung(max(1, min(epochs - 1, round(epochs / eta))), seeds, False)


def decide(round_index: int, members: Sequence[Group], accuracy: dict[str, float],
           previous: tuple[str, Sequence[str], float] | None, epsilon: float,
           last: bool) -> dict:
    """A round's decision. `members`: its candidates in plan order; `accuracy`: theirs (mean
    validation at the round's budget); `previous`: (candidate, units, accuracy) chosen before,
    None in round 1 (where the base is the head alone, one of its candidates). The leader is
    chosen when it gains at least `epsilon` over the base; the search stops when it does not,
    or after this round when `last` (no unit left, or the last round allowed).

    Returns the entry kept in schedule.json, shaped as a halving rung's (`kept`, `pruned`,
    `held`, `leader`, `within_chance`) plus the round's words: `round`, `candidates` (how
    many), `added` (the unit
    added, or None), `chosen` (the candidate going on) and its `units`, `gain`, `accuracy`,
    `stop`. A base that a new leader replaces is pruned too."""
    names = [g.candidate for g in members]
    by_name = {g.candidate: g for g in members}
    leader = max(names, key=lambda n: (accuracy[n], -names.index(n)))
    base, base_units, base_accuracy = previous or (HEAD, (), accuracy[HEAD])
    gain = accuracy[leader] - base_accuracy
    adopted = leader != base and gain >= epsilon
    chosen, units = (leader, list(by_name[leader].option)) if adopted else (base, list(base_units))
    pruned = {n: {"difference": accuracy[leader] - accuracy[n]} for n in names if n != chosen}
    if adopted and base not in by_name:
        pruned[base] = {"difference": accuracy[leader] - base_accuracy}
    return {"kept": [chosen], "pruned": pruned, "held": {}, "leader": leader,
            "within_chance": False, "round": round_index, "candidates": len(names),
            "added": next((u for u in units if u not in base_units), None) if adopted else None,
            "chosen": chosen, "units": units, "gain": gain,
            "accuracy": {**accuracy, **({base: base_accuracy} if previous else {})},
            "stop": (not adopted) or last}


def expected(round_sizes: Sequence[int], budget: halving.Rung,
             final: halving.Rung) -> tuple[int, int]:
    """(runs recorded, epochs trained over all runs) of a search whose rounds have
    `round_sizes` candidates each: every round's runs are recorded (pruned) but the chosen
    candidate's, which goes on to `final` with every seed."""
    early = len(budget.seeds)
    round_runs = sum(round_sizes) * early
    runs = round_runs - early + len(final.seeds)
    epochs = (round_runs * budget.epochs + early * (final.epochs - budget.epochs)
              + (len(final.seeds) - early) * final.epochs)
    return runs, epochs
