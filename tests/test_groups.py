"""Candidate groups from the layer table, and their masks."""
import jax
import numpy as np
import pytest

from blockft_jax import groups, models

SHAPE = (32, 32, 3)


@pytest.fixture(scope="module")
def tiny():
    module = models.create("mobilenet_v2", width=0.35, blocks=3, num_classes=3)
    return module, models.layer_table(module, SHAPE)


def weighted(table):
    return [r.name for r in groups.backbone_layers(table)]


def test_layerwise_is_top_down_and_skips_the_head(tiny):
    _, table = tiny
    found = groups.layerwise(table, max_layers=3)
    assert [g.layers for g in found] == [(n,) for n in weighted(table)[::-1][:3]]
    assert found[0].candidate == "layerwise:Conv_1_bn"
    assert all("head" not in g.layers for g in groups.layerwise(table))


def test_blocks_split_at_activation_and_pooling(tiny):
    _, table = tiny
    found = groups.blocks(table, ("pooling", "activation"))
    # The top run goes from out_relu down to block_2_depthwise_relu: an Add is no boundary, so
    # block_2's projection and the final 1x1 conv form one block.
    assert found[0].layers == ("block_2_project", "block_2_project_BN", "Conv_1", "Conv_1_bn")
    assert found[1].layers == ("block_2_depthwise", "block_2_depthwise_BN")
    assert found[2].layers == ("block_1_project", "block_1_project_BN", "block_2_expand",
                               "block_2_expand_BN")
    covered = [n for g in found for n in g.layers]
    assert sorted(covered) == sorted(weighted(table))  # every layer in exactly one block
    names = [r.name for r in table]
    for g in found:  # no boundary layer inside a block
        inside = names[names.index(g.layers[0]):names.index(g.layers[-1]) + 1]
        kinds = {r.kind for r in table if r.name in inside}
        assert not kinds & {"activation", "pooling"}
    assert len(groups.blocks(table, ("pooling", "activation"), max_blocks=2)) == 2


def test_blocks_by_units(tiny):
    _, table = tiny
    found = groups.blocks(table, "units")
    assert [g.candidate for g in found] == ["blocks:top", "blocks:block_2", "blocks:block_1",
                                            "blocks:block_0", "blocks:stem"]
    assert found[1].layers[0] == "block_2_expand"
    with pytest.raises(ValueError, match="unknown"):
        groups.blocks(table, ("pooling", "bogus"))


def test_windows_with_stride(tiny):
    _, table = tiny
    names = weighted(table)
    found = groups.windows(table, window=3, stride=2, max_windows=3)
    assert [g.layers for g in found] == [tuple(names[-3:]), tuple(names[-5:-2]),
                                         tuple(names[-7:-4])]
    assert len(groups.windows(table, window=len(names) + 1)) == 0


def test_topk_takes_best_layers_in_network_order(tiny):
    _, table = tiny
    ranking = ["Conv_1", "block_2_project", "Conv_1_bn"]
    (k2,) = groups.topk(ranking, [2], table)
    assert k2.layers == ("block_2_project", "Conv_1")
    with pytest.raises(ValueError, match="k=4"):
        groups.topk(ranking, [4])


def test_masks_and_bn_modes(tiny):
    module, table = tiny
    params = jax.eval_shape(module.init, jax.random.key(0),
                            np.zeros((1, *SHAPE), np.float32))["params"]
    layers = ("block_2_project", "block_2_project_BN")
    mask = groups.param_mask(params, table, layers)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    for layer, leaves in mask.items():
        assert all(bool(v) == (layer in layers or layer == "head") for v in leaves.values())
    modes = groups.bn_modes(table, layers)
    assert {k for k, v in modes.items() if v} == {"block_2_project_BN"}
    assert not any(groups.bn_modes(table, layers, freeze_bn=True).values())
    with pytest.raises(ValueError, match="not weighted layers"):
        groups.param_mask(params, table, ["Conv1_relu"])


def test_lowest_unit(tiny):
    _, table = tiny
    assert groups.lowest_unit(table, groups.layerwise(table, 2)) == "top"
    assert groups.lowest_unit(table, groups.full(table)) == "stem"
    assert groups.lowest_unit(table, groups.classifier_only()) == "head"
