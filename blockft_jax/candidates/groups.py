"""Candidate groups of layers, from the layer table, and the masks that train them.

A *layer* here is a layer with weights (conv, depthwise, batchnorm, dense) of the backbone; the
classifier head is trained with every group. Groups are listed from the output end, as the
paper searches. A group's parameter mask is a pytree shaped like `params` of learning-rate
multipliers (0 frozen, 1 the full rate, scaled by the candidate's setting; float32 for every
strategy, so that one compilation serves all); its BN modes say which BatchNorm layers use batch statistics (those
trained, Keras's rule for trainable BN) -- both are *data* for the one compiled train step. The
one-run methods' masks may change between epochs (`Inputs.mask_at`): data again, placed anew.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from flax import traverse_util

from blockft_jax.models import HEAD_UNIT, LayerRecord

BOUNDARY_KINDS = ("pooling", "activation", "padding", "add", "multiply", "rescaling", "dropout")


@dataclasses.dataclass(frozen=True)
class Group:
    strategy: str
    candidate: str            # short id, e.g. 'layerwise:block_16_project'
    layers: tuple[str, ...]   # trained backbone layers (the head always trains too)
    option: float | tuple | None = None  # a one-run method's: llrd's decay, gradual's
    # epochs per unit, lp_ft's probe epochs, auto_rgn's measurement batches, l2sp's (alpha, beta)
    # Its setting (settings.py): how the layers train.
    bn_policy: str = "train"
    lr_factor: float = 1.0


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


# --- today's one-run methods -----------------------------------------------------------------

def weighted_units(table) -> list[str]:
    """The backbone's units that hold weighted layers, from the top (next to the head) down."""
    return list(dict.fromkeys(r.unit for r in backbone_layers(table)))[::-1]


def unit_layers(table, units: Iterable[str]) -> tuple[str, ...]:
    """The weighted layers of `units`, bottom to top."""
    units = set(units)
    return tuple(r.name for r in backbone_layers(table) if r.unit in units)


def llrd(table, decays: Iterable[float]) -> list[Group]:
    """Layer-wise learning-rate decay: every layer trains, at `decay ** depth` of the rate."""
    layers = tuple(r.name for r in backbone_layers(table))
    return [Group("llrd", f"llrd:{d:g}", layers, float(d)) for d in decays]


def gradual_units(table, epoch: int, every: int) -> list[str]:
    """Gradual unfreezing's units in `epoch` (0-based): the top one first, one more each
    `every` epochs (the head always trains)."""
    units = weighted_units(table)
    return units[:min(len(units), 1 + epoch // every)]


def gradual(table, epochs_per_unit: Iterable[int], epochs: int) -> list[Group]:
    """Gradual unfreezing, per number of epochs between units: its layers are those it
    unfreezes within `epochs` (what its engine must reach)."""
    return [Group("gradual", f"gradual:{k}",
                  unit_layers(table, gradual_units(table, epochs - 1, k)), int(k))
            for k in epochs_per_unit]


def lp_ft(table, probe_epochs: int) -> list[Group]:
    """LP-FT (Kumar et al., ICLR 2022): a linear probe (the head alone) for `probe_epochs`
    epochs, then every layer from that head."""
    return [Group("lp_ft", "lp_ft", tuple(r.name for r in backbone_layers(table)),
                  int(probe_epochs))]


def l2sp(table, alphas: Iterable[float], beta: float) -> list[Group]:
    """L2-SP (Li et al., ICML 2018): every layer trains, pulled towards its starting weights
    (alpha / 2 * ||w - w0||^2) and the head towards 0 (beta / 2 * ||w_head||^2), per alpha."""
    layers = tuple(r.name for r in backbone_layers(table))
    return [Group("l2sp", f"l2sp:{a:g}", layers, (float(a), float(beta))) for a in alphas]


def auto_rgn(table, batches: int) -> list[Group]:
    """Auto-RGN: every layer but BatchNorm trains (as in its reference), at a multiplier
    measured each epoch."""
    layers = tuple(r.name for r in backbone_layers(table) if r.kind != "batchnorm")
    return [Group("auto_rgn", "auto_rgn", layers, int(batches))]


# --- masks ------------------------------------------------------------------------------------

def _multipliers(params, of: Callable[[tuple], float]) -> Any:
    # Host float32 scalars, one per tensor: the loop stacks and places them.
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: np.asarray(of(path), np.float32) for path in flat})


def param_mask(params, table, layers: Iterable[str]) -> Any:
    """Multipliers shaped like `params`: 1 for the group's layers and the head, else 0."""
    layers = set(layers)
    known = {r.name for r in backbone_layers(table)}
    unknown = sorted(layers - known)
    if unknown:
        raise ValueError(f"Layers {unknown[:5]} are not weighted layers of this model.")
    return _multipliers(params, lambda path: path[0] in layers or path[0] == HEAD_UNIT)


def llrd_mask(params, table, decay: float) -> Any:
    """`decay ** depth` per layer, depth counting units below the head: the head 1, the top
    unit `decay`, the next `decay ** 2`, ..."""
    depth = {u: i + 1 for i, u in enumerate(weighted_units(table))}
    unit = {r.name: r.unit for r in backbone_layers(table)}
    return _multipliers(params, lambda path: 1.0 if path[0] == HEAD_UNIT
                        else decay ** depth[unit[path[0]]])


def rgn_mask(params, table, norms: dict) -> Any:
    """Auto-RGN's multipliers (Lee et al. 2022, `get_lr_weights` with auto_tune='RGN'): per
    parameter tensor, its gradient norm on each measured batch (`norms['gradient']`: one per
    batch) over its norm (`norms['parameter']`), averaged over the batches, divided by the
    largest. BatchNorm layers
    take 0 (the reference trains none); the head is measured and normalised like the rest. A
    tensor of norm 0 (a fresh head's bias) has no relative gradient: it takes 1, outside the
    normalisation. Tensors without norms (outside the engine) take 0."""
    batchnorm = {r.name for r in table if r.kind == "batchnorm"}
    gradient = traverse_util.flatten_dict(norms["gradient"])
    parameter = traverse_util.flatten_dict(norms["parameter"])
    ratios = {path: float(np.mean(np.asarray(gradient[path], np.float64) /
                                  float(parameter[path])))
              for path in gradient if path[0] not in batchnorm and float(parameter[path]) > 0}
    largest = max(ratios.values(), default=0.0)

    def of(path):
        if path[0] in batchnorm or path not in gradient:
            return 0.0
        if path not in ratios:
            return 1.0
        return ratios[path] / largest if largest > 0 else 0.0
    return _multipliers(params, of)


def bn_modes(table, layers: Iterable[str], *, freeze_bn: bool = False) -> dict[str, np.ndarray]:
    """{BN layer: use batch statistics?} for every BatchNorm: Keras's rule, a BN trains (batch
    statistics, moving averages updated) exactly when it is in the trained group; with
    `freeze_bn` every BN stays in inference mode (the 'frozen' policy of settings.py)."""
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


@dataclasses.dataclass
class Inputs:
    """What a candidate's runs take: the mask and BN modes they start with, and for a mask
    that changes between epochs `mask_at(epoch, norms)` -> (mask, BN modes) of that epoch
    (0-based), `norms` the run's Auto-RGN measurement on `norm_batches` training batches from
    its current parameters (None when `norm_batches` is 0)."""
    mask: Any
    bn_modes: dict
    mask_at: Callable | None = None
    norm_batches: int = 0
    penalty: tuple[float, float] = (0.0, 0.0)  # L2-SP's (alpha, beta)


# The one-run methods' inputs (strategies.py names them): (params, table, group) -> Inputs.

def llrd_inputs(params, table, group: Group) -> Inputs:
    """llrd's multipliers, `decay ** depth`."""
    return Inputs(llrd_mask(params, table, group.option), bn_modes(table, group.layers))


def gradual_inputs(params, table, group: Group) -> Inputs:
    """Gradual unfreezing: its units by epoch."""
    def mask_at(epoch, norms=None):
        layers = unit_layers(table, gradual_units(table, epoch, int(group.option)))
        return param_mask(params, table, layers), bn_modes(table, layers)
    return Inputs(*mask_at(0), mask_at=mask_at)


def lp_ft_inputs(params, table, group: Group) -> Inputs:
    """LP-FT: the head alone (every BN in inference mode) before epoch `group.option`, then
    the whole network. The backbone's optimizer state starts fresh at the switch: frozen
    tensors keep zero moments and count no Adam steps (train.masked, train.scale_by_adam)."""
    def mask_at(epoch, norms=None):
        layers = group.layers if epoch >= group.option else ()
        return param_mask(params, table, layers), bn_modes(table, layers)
    return Inputs(*mask_at(0), mask_at=mask_at)


def l2sp_inputs(params, table, group: Group) -> Inputs:
    """L2-SP: every layer at the full rate, with its penalty's strengths (alpha, beta)."""
    return Inputs(param_mask(params, table, group.layers), bn_modes(table, group.layers),
                  penalty=tuple(map(float, group.option)))


def auto_rgn_inputs(params, table, group: Group) -> Inputs:
    """Auto-RGN: its multipliers measured at the start of each epoch on `group.option`
    batches. BatchNorm trains nowhere: its layers stay in inference mode (Keras's rule)."""
    return Inputs(param_mask(params, table, group.layers), bn_modes(table, group.layers),
                  mask_at=lambda epoch, norms: (rgn_mask(params, table, norms),
                                                bn_modes(table, group.layers)),
                  norm_batches=int(group.option))
