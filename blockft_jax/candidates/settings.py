"""How a candidate's layers train -- its *setting*: a BatchNorm policy and a learning-rate factor.

A candidate of a search is (layers, setting). A setting changes only what the one compiled
train step already takes as data -- the BN modes and the mask of learning-rate multipliers --
so searching settings adds runs, never compilations.

- BN policy (`search.bn_policies`): 'train', the BN layers a candidate trains use batch
  statistics and update their moving averages (Keras's rule for a trainable BN); 'frozen', every
  BN layer stays in inference mode and its moving averages never change, while its scale and
  offset still train where the candidate trains them (Keras's transfer-learning advice, timm's
  `freeze(..., include_bn_running_stats=True)`, torchvision's `FrozenBatchNorm2d`).
- Learning-rate factor (`search.lr_factors`): multiplies the backbone's rate
  (`train.learning_rate`). The head trains at `train.head_learning_rate` in every setting
  (None: the backbone's rate).

A setting that cannot change a candidate's training is not run twice: the BN policy matters only
where the candidate trains a BN layer, the factor only where it trains a backbone layer. Such a
candidate keeps the search's first setting of that kind, and its name says only what varies.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from flax import traverse_util

from blockft_jax.candidates.groups import Group, Inputs, backbone_layers
from blockft_jax.models import HEAD_UNIT

BN_POLICIES = ("train", "frozen")
SEPARATOR = "@"  # between a candidate's layers and its setting: 'blocks:block_16_project@bn=frozen'


@dataclasses.dataclass(frozen=True)
class Setting:
    bn_policy: str = "train"
    lr_factor: float = 1.0


def of_config(config) -> list[Setting]:
    """The search's settings: every BN policy with every factor, in config order."""
    return [Setting(p, float(f)) for p in config.search.bn_policies
            for f in config.search.lr_factors]


def head_factor(config) -> float:
    """The head's learning rate as a multiple of the backbone's (train.learning_rate)."""
    head = config.train.head_learning_rate
    return 1.0 if head is None else float(head) / float(config.train.learning_rate)


def base(candidate: str) -> str:
    """A candidate's name without its setting: the layers it trains."""
    return candidate.split(SEPARATOR)[0]


def label(setting: Setting, bn: bool = True, lr: bool = True) -> str:
    """'bn=frozen,lr=x0.1' (the parts asked for)."""
    parts = ([f"bn={setting.bn_policy}"] if bn else []) + (
        [f"lr=x{setting.lr_factor:g}"] if lr else [])
    return ",".join(parts)


def expand(members: Sequence[Group], table, settings: Sequence[Setting]) -> list[Group]:
    """Each group under each setting that can change its training (group by group, settings in
    config order). Names carry the setting's parts that vary in the search and matter for the
    group; with one setting, names are the groups' own."""
    policies = list(dict.fromkeys(s.bn_policy for s in settings))
    factors = list(dict.fromkeys(s.lr_factor for s in settings))
    kinds = {r.name: r.kind for r in table}
    backbone = {r.name for r in backbone_layers(table)}
    out = []
    for group in members:
        trains_bn = any(kinds.get(name) == "batchnorm" for name in group.layers)
        trains_backbone = any(name in backbone for name in group.layers)
        bn, lr = len(policies) > 1 and trains_bn, len(factors) > 1 and trains_backbone
        seen = set()
        for s in settings:
            kept = Setting(s.bn_policy if bn else policies[0],
                           s.lr_factor if lr else factors[0])
            if kept in seen:
                continue
            seen.add(kept)
            suffix = label(kept, bn, lr)
            out.append(dataclasses.replace(
                group, candidate=group.candidate + (SEPARATOR + suffix if suffix else ""),
                bn_policy=kept.bn_policy, lr_factor=kept.lr_factor))
    return out


def expected_names(names: Sequence[str], settings: Sequence[Setting]) -> list[str]:
    """Candidates' names under `settings` before their layers are known (topk's before the
    ranking): every part that varies in the search (`expand` drops those that cannot matter
    once the layers are known)."""
    bn = len({s.bn_policy for s in settings}) > 1
    lr = len({s.lr_factor for s in settings}) > 1
    return [name + (SEPARATOR + label(s, bn, lr) if bn or lr else "")
            for name in names for s in settings]


def apply(inputs: Inputs, group: Group, head: float) -> Inputs:
    """A candidate's inputs under its setting: the backbone's multipliers times its factor,
    the head's times `head` (the head's rate over the backbone's), and under 'frozen' every BN
    in inference mode. Factors of 1 under 'train' change nothing, bitwise."""
    factor, frozen = group.lr_factor, group.bn_policy == "frozen"
    if factor == 1.0 and head == 1.0 and not frozen:
        return inputs

    def mask(m):
        flat = traverse_util.flatten_dict(m)
        return traverse_util.unflatten_dict({
            path: np.asarray(value * np.float32(head if path[0] == HEAD_UNIT else factor),
                             np.float32) for path, value in flat.items()})

    def bn(modes):
        return {k: np.asarray(False) for k in modes} if frozen else modes

    def mask_at(epoch, norms=None, inner=inputs.mask_at):
        m, b = inner(epoch, norms)
        return mask(m), bn(b)
    return dataclasses.replace(inputs, mask=mask(inputs.mask), bn_modes=bn(inputs.bn_modes),
                               mask_at=mask_at if inputs.mask_at is not None else None)


def of_group(group: Group) -> dict:
    """A candidate's setting as results rows and model.json record it."""
    return {"bn_policy": group.bn_policy, "lr_factor": group.lr_factor}
