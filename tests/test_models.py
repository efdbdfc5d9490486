"""Ports vs Keras itself: outputs, layer tables, parameter counts, unit slicing."""
import functools

import jax
import numpy as np
import pytest

from blockft_jax import models
from blockft_jax.inputs import weights
from keras_oracle import reference

# (model, width, input size, options): small inputs and reduced widths keep this fast on CPU;
# odd sizes exercise Keras's asymmetric padding.
CASES = [
    ("vgg16", 1.0, 32, ()),
    ("mobilenet_v1", 0.25, 35, ()),
    ("mobilenet_v1", 0.5, 32, (("depth_multiplier", 2),)),
    ("mobilenet_v2", 0.35, 33, ()),
    ("mobilenet_v2", 1.3, 32, ()),
    ("mobilenet_v3_small", 0.75, 37, ()),
    ("mobilenet_v3_small", 1.0, 32, (("minimalistic", True),)),
    ("mobilenet_v3_large", 1.0, 35, ()),
    ("resnet50_v2", 1.0, 33, ()),
]
IDS = [f"{n}-{w}-{s}{'-' + '-'.join(f'{k}={v}' for k, v in o) if o else ''}"
       for n, w, s, o in CASES]


def build(name, width, options, **extra):
    return models.create(name, width=width, **dict(options), **extra)


def run(module, variables, x, **kwargs):
    """The module applied as the search applies it, one compiled program: op by op, a model's
    forward pass takes three times longer here (each operation compiled on its own)."""
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, x)


def assert_close(actual, expected):
    scale = float(np.max(np.abs(expected)))
    diff = float(np.max(np.abs(np.asarray(actual) - expected)))
    assert actual.shape == expected.shape
    assert diff <= 1e-4 * scale, f"max|diff| {diff:.3g} > 1e-4 * output scale {scale:.3g}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layer_table_matches_keras(case):
    name, width, size, options = case
    ref = reference(*case)
    table = models.layer_table(build(name, width, options), (size, size, 3))
    assert [(r.name, r.keras_class) for r in table] == list(ref.layers)
    for r in table:
        assert r.has_weights == bool(r.variables)
        assert r.unit is not None


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parameter_count_matches_keras(case):
    name, width, size, options = case
    ref = reference(*case)
    variables = weights.load_keras(ref.legacy_h5, build(name, width, options), (size, size, 3))
    assert sum(np.size(v) for v in jax.tree.leaves(variables)) == ref.param_count


@pytest.mark.parametrize("fmt", ["legacy_h5", "keras3_h5"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_match_keras(case, fmt):
    name, width, size, options = case
    ref = reference(*case)
    # Every implementation choice against Keras: native convolutions, and CPU's rewrites.
    impls = [("native", "native"), ("shifted", "matmul")] if name.startswith("mobilenet") \
        else [("auto", "native"), ("auto", "matmul")]
    for depthwise_impl, conv_impl in impls:
        module = build(name, width, options, depthwise_impl=depthwise_impl, conv_impl=conv_impl)
        variables = weights.load_keras(getattr(ref, fmt), module, (size, size, 3))
        assert set(variables) == {"params", "batch_stats"}
        assert_close(run(module, variables, ref.x, train=False), ref.y)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prefix_then_suffix_equals_whole(case):
    name, width, size, options = case
    ref = reference(*case)
    module = build(name, width, options, num_classes=3)
    variables = weights.load_keras(ref.legacy_h5, module, (size, size, 3))
    units = module.unit_names()
    assert units[-1] == models.HEAD_UNIT and len(units) >= 4
    table_units = [r.unit for r in models.layer_table(module, (size, size, 3))]
    assert sorted(set(table_units), key=units.index) == units  # every unit owns layers, in order
    cuts = (1, len(units) // 2, len(units) - 2)

    @jax.jit  # the whole pass and each cut's two halves in one program (one compilation)
    def passes(variables, x):
        split = [module.apply(variables, module.apply(variables, x, to_unit=units[cut - 1]),
                              from_unit=units[cut]) for cut in cuts]
        return module.apply(variables, x), split

    whole, split = passes(variables, ref.x)
    for suffix in split:
        np.testing.assert_allclose(suffix, whole, rtol=1e-5, atol=1e-5)


def test_head_is_gap_dropout_dense():
    module = models.create("mobilenet_v2", num_classes=7, width=0.35, dropout_rate=0.2)
    variables = jax.jit(module.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    assert variables["params"]["head"]["kernel"].shape == (1280, 7)
    x = np.ones((2, 32, 32, 3), np.float32)
    assert run(module, variables, x).shape == (2, 7)
    table = models.layer_table(module, (32, 32, 3))
    assert [r.name for r in table if r.unit == "head"] == ["avg_pool", "head_dropout", "head"]


def test_names_mirror_keras():
    module = models.create("mobilenet_v2")
    shapes = jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
    assert shapes["params"]["block_16_project"]["kernel"].shape == (1, 1, 960, 320)
    assert shapes["batch_stats"]["block_16_project_BN"]["mean"].shape == (320,)


def test_create_rejects_bad_input():
    with pytest.raises(ValueError, match="Unknown model 'resnet18'.*mobilenet_v2"):
        models.create("resnet18")
    with pytest.raises(ValueError, match="Unknown option.*alpha"):
        models.create("mobilenet_v2", alpha=0.5)
    with pytest.raises(ValueError, match="Unknown unit"):
        module = models.create("mobilenet_v2", width=0.35)
        variables = jax.eval_shape(module.init, jax.random.key(0),
                                   np.zeros((1, 32, 32, 3), np.float32))
        jax.eval_shape(functools.partial(module.apply, to_unit="block_99"), variables,
                       np.zeros((1, 32, 32, 3), np.float32))
