"""Candidate groups of layers, from the layer table, and the masks that train them.

A *layer* here is a layer with weights (conv, depthwise, batchnorm, dense) of the backbone; the
classifier head is trained with every group. Groups are listed from the output end, as the
paper searches. A group's parameter mask is a pytree of booleans shaped like `params`; its BN
modes say which BatchNorm layers use batch statistics (those in the group, Keras's rule for
trainable BN) -- both are *data* for the one compiled train step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
from flax import traverse_util

from blockft_jax.models import HEAD_UNIT, LayerRecord

STRATEGIES = ("classifier_only", "full", "layerwise", "topk", "blocks", "window")
# The order a search runs them in: layerwise before topk (topk needs its ranking); full last.
SEARCH_ORDER = ("classifier_only", "layerwise", "topk", "blocks", "window", "full")
BOUNDARY_KINDS = ("pooling", "activation", "padding", "add", "multiply", "rescaling", "dropout")


@dataclasses.dataclass(frozen=True)
class Group:
    strategy: str
    candidate: str            # short id, e.g. 'layerwise:block_16_project'
    layers: tuple[str, ...]   # trained backbone layers (the head always trains too)


def backbone_layers(table: Sequence[LayerRecord]) -> list[LayerRecord]:
    """Layers with weights, bottom to top, without the classifier head."""
    return [r for r in table if r.has_weights and r.unit != HEAD_UNIT]


def classifier_only() -> list[Group]:
    return [Group("classifier_only", "classifier_only", ())]


def full(table) -> list[Group]:
    return [Group("full", "full", tuple(r.name for r in backbone_layers(table)))]


def layerwise(table, max_layers: int | None = None) -> list[Group]:
    """Each single layer, from the top down to `max_layers` layers deep."""
    layers = backbone_layers(table)[::-1][:max_layers]
    return [Group("layerwise", f"layerwise:{r.name}", (r.name,)) for r in layers]


def topk_candidate(k: int) -> str:
    """The candidate name of top-k (known before the layer-wise ranking that fills it)."""
    return f"topk:{k}"


def topk(ranking: Sequence[str], ks: Iterable[int], table=None) -> list[Group]:
    """The k best layers of a layer-wise ranking (best first), trained jointly, per k. With a
    table, the layers are listed bottom to top."""
    order = {r.name: i for i, r in enumerate(table)} if table is not None else None
    groups = []
    for k in ks:
        if not 1 <= k <= len(ranking):
            raise ValueError(f"topk k={k}: the layer-wise ranking has {len(ranking)} layers; "
                             f"choose k in 1..{len(ranking)} (or raise search.max_layers).")
        chosen = list(ranking[:k])
        if order is not None:
            chosen.sort(key=order.__getitem__)
        groups.append(Group("topk", topk_candidate(k), tuple(chosen)))
    return groups


def blocks(table, boundaries: Sequence[str] | str = ("pooling", "activation"),
           max_blocks: int | None = None) -> list[Group]:
    """Runs of consecutive weighted layers between non-weight layers of the `boundaries`
    kinds (the paper: pooling and activation), from the top. `boundaries='units'` uses the
    architecture's own named blocks (VGG `block5`, MobileNetV2 `block_16`, ...)."""
    if isinstance(boundaries, str):
        if boundaries != "units":
            raise ValueError(f"block_boundaries={boundaries!r}: use 'units' or a list of kinds "
                             f"from {BOUNDARY_KINDS}.")
        runs: dict[str, list[str]] = {}
        for r in backbone_layers(table):
            runs.setdefault(r.unit, []).append(r.name)
        found = [(unit, names) for unit, names in runs.items()]
    else:
        unknown = sorted(set(boundaries) - set(BOUNDARY_KINDS))
        if unknown:
            raise ValueError(f"block_boundaries {unknown} unknown; choose from {BOUNDARY_KINDS}.")
        found, current = [], []
        for r in table:
            if r.unit == HEAD_UNIT:
                break
            if r.has_weights:
                current.append(r.name)
            elif r.kind in boundaries and current:
                found.append((current[-1], current))
                current = []
        if current:
            found.append((current[-1], current))
    found = found[::-1][:max_blocks]
    return [Group("blocks", f"blocks:{label}", tuple(names)) for label, names in found]


def windows(table, window: int, stride: int | None = None,
            max_windows: int | None = None) -> list[Group]:
    """Fixed-length windows of consecutive layers with the given stride, from the top."""
    if window < 1 or (stride is not None and stride < 1):
        raise ValueError(f"window={window}, stride={stride}: both must be >= 1.")
    stride = stride or window
    names = [r.name for r in backbone_layers(table)]
    groups = []
    end = len(names)
    while end - window >= 0 and (max_windows is None or len(groups) < max_windows):
        chosen = tuple(names[end - window:end])
        groups.append(Group("window", f"window:{chosen[-1]}-{window}", chosen))
        end -= stride
    return groups


# --- masks ------------------------------------------------------------------------------------

def param_mask(params, table, layers: Iterable[str]) -> Any:
    """Booleans shaped like `params`: True for the group's layers and the head."""
    layers = set(layers)
    known = {r.name for r in backbone_layers(table)}
    unknown = sorted(layers - known)
    if unknown:
        raise ValueError(f"Layers {unknown[:5]} are not weighted layers of this model.")
    flat = traverse_util.flatten_dict(params)
    # Host booleans: the loop stacks and places them once per cohort.
    return traverse_util.unflatten_dict(
        {path: np.asarray(path[0] in layers or path[0] == HEAD_UNIT) for path in flat})


def bn_modes(table, layers: Iterable[str], *, freeze_bn: bool = False) -> dict[str, np.ndarray]:
    """{BN layer: use batch statistics?} for every BatchNorm: Keras's rule, a BN trains (batch
    statistics, moving averages updated) exactly when it is in the trained group; with
    `freeze_bn` every BN stays in inference mode."""
    layers = set(layers)
    return {r.name: np.asarray(not freeze_bn and r.name in layers)
            for r in table if r.kind == "batchnorm"}


def lowest_unit(table, groups: Iterable[Group]) -> str:
    """The lowest unit that any group trains: below it, nothing needs a gradient."""
    index = {r.name: i for i, r in enumerate(table)}
    trained = [index[name] for g in groups for name in g.layers]
    if not trained:
        return HEAD_UNIT if any(r.unit == HEAD_UNIT for r in table) else table[-1].unit
    return table[min(trained)].unit
