"""Every strategy in one place: its candidates, how its masks change, whether it is a baseline,
where its engine starts, what the report and the dry run call it.

Adding a strategy: its candidate function (and, for a mask that is not a fixed 0/1 one, its
inputs) in groups.py, one `Strategy` below, and its tests. Plan, search, costs and report read
the registry; none of them names a strategy.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from blockft_jax.candidates import groups, subtuning
from blockft_jax.candidates.groups import Group, Inputs


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    label: str                    # the report's name
    # (config, table, ranking) -> its groups of layers, before settings (`ranking`: the
    # strategy named by `after`'s ranked layers, best first; None for the others).
    candidates: Callable[..., list[Group]]
    baseline: bool = False        # its candidates are options, not a search: never pruned
    whole_network: bool = False   # every layer may train from the first epoch: full's engine
    # (params, table, group) -> Inputs, for masks of multipliers or masks that change by
    # epoch; None: a fixed mask, 1 for the group's layers and the head.
    inputs: Callable[..., Inputs] | None = None
    measures: bool = False        # measures gradient norms each epoch (one more compiled step)
    penalises: bool = False       # a penalty pulls towards the start: its engine carries w0
    after: str | None = None      # the strategy whose ranking it needs: it runs after it
    # For a strategy planned `after` another: its candidates' names before the ranking fills
    # them (config -> names), and the dry run's words for them.
    names_before: Callable[[Any], list[str]] | None = None
    preview: Callable[[Any], str] | None = None  # (and how a strategy in rounds goes on)
    style: Any = None             # a baseline's line on the searched strategies' plots
    # (config) -> the report's name where the config changes what the strategy is, else None.
    label_of: Callable[[Any], str | None] | None = None
    # (config) -> what is wrong with the search keys it reads (one line), or None.
    check: Callable[[Any], str | None] | None = None
    # Its candidates come in rounds, each round's from the last one's choice (subtuning.py):
    # `candidates`' ranking is then the units chosen so far (None: the first round).
    rounds: bool = False


def boundaries(text: str):
    """'pooling,activation' -> ('pooling', 'activation'); 'units' stays as it is."""
    return "units" if text.strip() == "units" else tuple(
        kind.strip() for kind in text.split(",") if kind.strip())


def _reach(value):
    return value or None  # 0 (or None): the whole backbone


def _check_topk(config) -> str | None:
    s = config.search
    if s.max_layers and s.topk and max(s.topk) > s.max_layers:
        return (f"search.topk asks for k={max(s.topk)} but layerwise ranks only "
                f"search.max_layers={s.max_layers} layers; raise max_layers.")
    return None


def _check_blocks(config) -> str | None:
    try:
        groups.blocks([], boundaries(config.search.block_boundaries))
    except ValueError as e:
        return f"search.block_boundaries: {e}"
    return None


def _check_lp_ft(config) -> str | None:
    probe, epochs = config.search.lp_epochs, config.train.epochs
    if not 1 <= probe < epochs:
        return (f"search.lp_epochs={probe}: LP-FT probes the head for lp_epochs epochs, then "
                f"fine-tunes every layer; choose 1..{epochs - 1} (train.epochs={epochs}).")
    return None


def _check_l2sp(config) -> str | None:
    alphas, beta = tuple(config.search.l2sp_alphas), config.search.l2sp_beta
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1e6
    if not alphas or not all(map(number, alphas)) or len(set(alphas)) < len(alphas):
        return (f"search.l2sp_alphas={alphas!r}: use distinct numbers >= 0 (L2-SP's pull "
                f"towards the starting weights, one candidate each), e.g. (0.01, 0.1).")
    if not number(beta):
        return f"search.l2sp_beta={beta!r}: use a number >= 0 (the head's L2 penalty), e.g. 0.01."
    return None


def _check_subtuning(config) -> str | None:
    s = config.search
    whole = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0
    if not whole(s.subtuning_units) or not whole(s.subtuning_rounds):
        return (f"search.subtuning_units={s.subtuning_units!r}, search.subtuning_rounds="
                f"{s.subtuning_rounds!r}: use whole numbers >= 0 (0: every unit; no limit on "
                f"the rounds but the units and epsilon).")
    eps = s.subtuning_epsilon
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 <= eps < 1):
        return (f"search.subtuning_epsilon={eps!r}: use a number >= 0 and < 1 (the least gain "
                f"in validation accuracy for which a round adds its unit), e.g. 0.01.")
    if config.train.epochs < 2:
        return (f"train.epochs={config.train.epochs}: subtuning's rounds train fewer epochs "
                f"than its chosen units' final runs; use train.epochs >= 2 or drop subtuning.")
    return None


def _fixed(params, table, group: Group) -> Inputs:
    return Inputs(groups.param_mask(params, table, group.layers),
                  groups.bn_modes(table, group.layers))


_ALL = [
    Strategy("classifier_only", "Classifier only (baseline)",
             lambda c, table, ranking: groups.classifier_only(), baseline=True, style=":"),
    Strategy("layerwise", "Layer-wise",
             lambda c, table, ranking: groups.layerwise(table, _reach(c.search.max_layers))),
    Strategy("topk", "Top-k layers",
             lambda c, table, ranking: groups.topk(ranking, c.search.topk, table),
             after="layerwise",
             names_before=lambda c: [groups.topk_candidate(k) for k in c.search.topk],
             preview=lambda c: f"k in {list(c.search.topk)}: the k best layers of the "
                               f"layer-wise ranking (known once layerwise has run)",
             check=_check_topk),
    Strategy("blocks", "Blocks",
             lambda c, table, ranking: groups.blocks(table, boundaries(c.search.block_boundaries),
                                                     _reach(c.search.max_blocks)),
             check=_check_blocks,
             # One unit at a time is Lee et al.'s (ICLR 2023) surgical fine-tuning, picked on
             # validation: their oracle.
             label_of=lambda c: ("Blocks = units (the surgical fine-tuning oracle)"
                                 if boundaries(c.search.block_boundaries) == "units" else None)),
    Strategy("window", "Sliding window",
             lambda c, table, ranking: groups.windows(table, c.search.window, c.search.stride,
                                                      _reach(c.search.max_windows))),
    Strategy("gradual", "Gradual unfreezing (baseline)",
             lambda c, table, ranking: groups.gradual(table, c.search.gradual_epochs,
                                                      c.train.epochs),
             baseline=True, inputs=groups.gradual_inputs, style=(0, (5, 1))),
    Strategy("full", "Full fine-tuning (baseline)",
             lambda c, table, ranking: groups.full(table), baseline=True, whole_network=True,
             style="-."),
    Strategy("llrd", "Layer-wise LR decay (baseline)",
             lambda c, table, ranking: groups.llrd(table, c.search.llrd_decays),
             baseline=True, whole_network=True, inputs=groups.llrd_inputs, style="--"),
    Strategy("lp_ft", "LP-FT (baseline)",
             lambda c, table, ranking: groups.lp_ft(table, c.search.lp_epochs),
             baseline=True, whole_network=True, inputs=groups.lp_ft_inputs,
             style=(0, (1, 1)), check=_check_lp_ft),
    Strategy("l2sp", "L2-SP (baseline)",
             lambda c, table, ranking: groups.l2sp(table, c.search.l2sp_alphas,
                                                   c.search.l2sp_beta),
             baseline=True, whole_network=True, inputs=groups.l2sp_inputs, penalises=True,
             style=(0, (2, 1, 2, 3)), check=_check_l2sp),
    Strategy("auto_rgn", "Auto-RGN (baseline)",
             lambda c, table, ranking: groups.auto_rgn(table, c.search.auto_rgn_batches),
             baseline=True, whole_network=True, inputs=groups.auto_rgn_inputs, measures=True,
             style=(0, (3, 1, 1, 1, 1, 1))),
    Strategy("subtuning", "SubTuning (greedy units)",
             lambda c, table, chosen: subtuning.round_groups(table, chosen, subtuning.reach_of(c)),
             rounds=True, check=_check_subtuning,
             preview=lambda c: subtuning.words(c)),
]
# In the order a search runs them: a strategy after the one whose ranking it needs; the
# strategies that train the whole network last (a phase's strategies in rounds after its
# others).
REGISTRY: dict[str, Strategy] = {s.name: s for s in _ALL}
SEARCH_ORDER = tuple(REGISTRY)
BASELINES = tuple(s.name for s in _ALL if s.baseline)
WHOLE_NETWORK = tuple(s.name for s in _ALL if s.whole_network)
ROUNDS = tuple(s.name for s in _ALL if s.rounds)
# The one-run methods in use today: masks of multipliers, or masks that change by epoch.
ONE_RUN_METHODS = tuple(s.name for s in _ALL if s.inputs is not None)
LABELS = {s.name: s.label for s in _ALL}


def labels(config, names) -> dict[str, str]:
    """The report's name of each strategy in `names`, as `config` makes it."""
    return {name: (REGISTRY[name].label_of and REGISTRY[name].label_of(config)) or LABELS[name]
            for name in names}


def inputs(params, table, group: Group) -> Inputs:
    """A candidate's `Inputs` before its setting (settings.apply)."""
    return (REGISTRY[group.strategy].inputs or _fixed)(params, table, group)


def candidates(config, table, name: str, ranking=None) -> list[Group]:
    """A strategy's groups of layers (before settings)."""
    return REGISTRY[name].candidates(config, table, ranking)
