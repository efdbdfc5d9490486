"""Candidate groups from the layer table, and their masks."""
import jax
import numpy as np
import pytest

from blockft_jax import models
from blockft_jax.candidates import groups, strategies

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


# --- today's one-run methods --------------------------------------------------------------------

def shapes(module):
    return jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, *SHAPE), np.float32))


def by_layer(mask):
    """{layer: its one multiplier} (every tensor of a layer shares it)."""
    out = {}
    for layer, leaves in mask.items():
        values = {float(v) for v in leaves.values()}
        assert len(values) == 1, (layer, values)
        out[layer] = values.pop()
    return out


def test_masks_are_float32_multipliers_for_every_strategy(tiny):
    module, table = tiny
    params = shapes(module)["params"]
    for group in (groups.classifier_only() + groups.full(table) + groups.llrd(table, [0.5])
                  + groups.gradual(table, [1], 3) + groups.auto_rgn(table, 2)):
        inputs = strategies.inputs(params, table, group)
        assert {np.asarray(x).dtype for x in jax.tree.leaves(inputs.mask)} == {np.dtype(np.float32)}
        assert all(0 <= float(x) <= 1 for x in jax.tree.leaves(inputs.mask))


@pytest.mark.parametrize("decay", [0.5, 0.8])
def test_llrd_multipliers_decay_by_unit_below_the_head(tiny, decay):
    """From the model's own units: the head trains at the full rate, the unit below it at
    `decay`, each further unit down one more factor; every layer of a unit shares it."""
    module, table = tiny
    params = shapes(module)["params"]
    (group,) = groups.llrd(table, [decay])
    assert group.layers == tuple(weighted(table)) and group.candidate == f"llrd:{decay:g}"
    multiplier = by_layer(groups.llrd_mask(params, table, decay))
    assert multiplier.pop(models.HEAD_UNIT) == 1.0
    # The model's units with weights, from the head down.
    names = module.unit_names()
    units = [u for u in reversed(names[:names.index(models.HEAD_UNIT)])
             if any(r.unit == u and r.has_weights for r in table)]
    unit_of = {r.name: r.unit for r in table}
    per_unit = {}
    for layer, m in multiplier.items():
        assert per_unit.setdefault(unit_of[layer], m) == m, layer
    assert list(per_unit) != [] and set(per_unit) == set(units)
    expected = 1.0
    for unit in units:
        expected *= decay
        assert per_unit[unit] == pytest.approx(expected, rel=1e-6), unit
    # Every layer trains, BatchNorm included (with batch statistics).
    assert all(strategies.inputs(params, table, group).bn_modes.values())


def test_gradual_unfreezes_one_unit_every_k_epochs_from_the_top(tiny):
    module, table = tiny
    params = shapes(module)["params"]
    names = module.unit_names()
    below_head = [u for u in names[:names.index(models.HEAD_UNIT)]
                  if any(r.unit == u and r.has_weights for r in table)][::-1]
    k, epochs = 2, 5
    (group,) = groups.gradual(table, [k], epochs)
    inputs = strategies.inputs(params, table, group)
    trained_units = []
    for epoch in range(epochs):
        mask, bn = inputs.mask_at(epoch, None)
        trained = {layer for layer, m in by_layer(mask).items() if m > 0} - {models.HEAD_UNIT}
        units = {r.unit for r in table if r.name in trained}
        # Whole units, the top ones, one more each k epochs.
        assert units == set(below_head[:1 + epoch // k]), epoch
        assert trained == {r.name for r in groups.backbone_layers(table) if r.unit in units}
        assert {name for name, on in bn.items() if on} == {
            r.name for r in table if r.kind == "batchnorm" and r.unit in units}
        trained_units.append(units)
    # The group's layers: all it unfreezes within the epochs (what its engine must reach).
    assert set(group.layers) == {r.name for r in groups.backbone_layers(table)
                                 if r.unit in trained_units[-1]}
    assert inputs.norm_batches == 0  # the mask it starts with is epoch 0's
    np.testing.assert_equal(jax.tree.leaves(inputs.mask), jax.tree.leaves(
        inputs.mask_at(0, None)[0]))
    # Past the last unit, the whole backbone stays unfrozen.
    assert set(groups.gradual_units(table, 10 ** 6, 1)) == set(below_head)


def test_auto_rgn_multipliers_normalise_relative_gradient_norms(tiny):
    module, table = tiny
    params = shapes(module)["params"]
    (group,) = groups.auto_rgn(table, 3)
    batchnorm = {r.name for r in table if r.kind == "batchnorm"}
    assert set(group.layers) == set(weighted(table)) - batchnorm and group.option == 3
    rng = np.random.default_rng(0)
    gradient = jax.tree.map(lambda x: rng.uniform(0.1, 2.0, 3), params)
    parameter = jax.tree.map(lambda x: rng.uniform(0.5, 3.0), params)
    parameter[models.HEAD_UNIT]["bias"] = np.float32(0.0)  # a fresh head's bias
    mask = groups.rgn_mask(params, table, {"gradient": gradient, "parameter": parameter})
    ratio = {}
    for layer, leaves in params.items():
        for name in leaves:
            if layer in batchnorm:
                assert float(mask[layer][name]) == 0.0
            elif (layer, name) != (models.HEAD_UNIT, "bias"):
                ratio[layer, name] = np.mean(gradient[layer][name] / parameter[layer][name])
    largest = max(ratio.values())
    for (layer, name), r in ratio.items():
        assert float(mask[layer][name]) == pytest.approx(r / largest, rel=1e-6)
    assert max(float(mask[layer][name]) for layer, name in ratio) == 1.0
    assert float(mask[models.HEAD_UNIT]["bias"]) == 1.0  # no norm to be relative to
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    inputs = strategies.inputs(params, table, group)
    assert inputs.norm_batches == 3 and not any(inputs.bn_modes.values())
