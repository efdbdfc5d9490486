"""What every backbone shares: a sequence of units, the classifier head, and the layer table.

A backbone is a list of *units* (stem, each block, the final layers) with a single tensor at
every boundary. `__call__` can run any contiguous range of them with the same variables, which
lets the engine stop gradients at a unit boundary and cache the output of a frozen prefix.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from blockft_jax.models import layers as L

Unit = tuple[str, Callable[[jax.Array, L.TrainMode], jax.Array]]
HEAD_UNIT = "head"


class Backbone(nn.Module):
    """Base class. Subclasses implement `units()`; every layer is created directly under the
    model (flat, Keras-named variables) by the unit functions."""

    num_classes: int | None = None
    dropout_rate: float = 0.0
    depthwise_impl: str = "auto"
    conv_impl: str = "auto"
    dtype: Any = jnp.float32

    # Keras's `preprocess_input` mode for this architecture: 'caffe', 'tf' or 'raw'.
    preprocessing: ClassVar[str] = "tf"

    def units(self) -> list[Unit]:
        raise NotImplementedError

    def all_units(self) -> list[Unit]:
        units = list(self.units())
        if self.num_classes is not None:
            units.append((HEAD_UNIT, self._head))
        return units

    def unit_names(self) -> list[str]:
        return [name for name, _ in self.all_units()]

    def _head(self, x, train):
        x = L.GlobalAveragePooling2D(name="avg_pool")(x)
        if self.dropout_rate > 0:
            x = L.Dropout(self.dropout_rate, name="head_dropout")(x, train)
        return L.Dense(self.num_classes, dtype=self.dtype, name=HEAD_UNIT)(x).astype(jnp.float32)

    def enter_unit(self, name: str) -> str:
        """No-op marker, called before each unit runs; the layer table intercepts it."""
        return name

    @nn.compact
    def __call__(self, x, train: L.TrainMode = False, *, from_unit: str | None = None,
                 to_unit: str | None = None):
        """Runs units `from_unit` .. `to_unit` (both inclusive; default: all). `x` is the input
        of `from_unit`; the result is the output of `to_unit`."""
        units = self.all_units()
        names = [name for name, _ in units]
        start = self._unit_index(names, from_unit, 0)
        stop = self._unit_index(names, to_unit, len(names) - 1)
        if start > stop:
            raise ValueError(f"from_unit={from_unit!r} comes after to_unit={to_unit!r}.")
        if self.is_initializing() and (start, stop) != (0, len(names) - 1):
            raise ValueError("Initialise the whole model (no from_unit/to_unit).")
        for name, fn in units[start:stop + 1]:
            self.enter_unit(name)
            x = fn(x, train)
        return x

    @staticmethod
    def _unit_index(names, name, default):
        if name is None:
            return default
        if name not in names:
            raise ValueError(f"Unknown unit {name!r}; this model's units are {names}.")
        return names.index(name)

    # Small helpers shared by the architectures.
    def conv(self, features, kernel_size=1, strides=1, padding="valid", use_bias=True,
             activation=None, name=None):
        return L.Conv2D(features, kernel_size, strides, padding, use_bias, activation,
                        impl=self.conv_impl, dtype=self.dtype, name=name)

    def depthwise(self, kernel_size=3, strides=1, padding="valid", use_bias=True,
                  depth_multiplier=1, name=None):
        return L.DepthwiseConv2D(kernel_size, strides, padding, depth_multiplier, use_bias,
                                 impl=self.depthwise_impl, dtype=self.dtype, name=name)


def correct_pad(x, kernel_size: int | Sequence[int]):
    """Keras's imagenet_utils.correct_pad: zero padding before a stride-2 'valid' convolution."""
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    adjust = (1 - x.shape[1] % 2, 1 - x.shape[2] % 2)
    correct = (k[0] // 2, k[1] // 2)
    return ((correct[0] - adjust[0], correct[0]), (correct[1] - adjust[1], correct[1]))


# (module, (H, W, C)) -> variable shapes. Each is a trace of the whole model (about 0.5 s for a
# small MobileNet), wanted by the layer table, weight loading and head init alike. Modules are
# frozen dataclasses: equal configurations hash equal. Values are trees of ShapeDtypeStructs.
_VARIABLE_SHAPES: dict = {}


def variable_shapes(module: Backbone, input_shape: Sequence[int]) -> dict:
    """The module's variables as shapes and dtypes only (nothing computed)."""
    key = (module, tuple(input_shape)[-3:])
    if key not in _VARIABLE_SHAPES:
        _VARIABLE_SHAPES[key] = jax.eval_shape(
            module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *key[1]), jnp.float32))
    return _VARIABLE_SHAPES[key]


def init_variables(module: Backbone, input_shape: Sequence[int], rng=None) -> dict:
    """Freshly initialised variables, compiled (eager init of a whole CNN runs op by op)."""
    shape = (1, *tuple(input_shape)[-3:])
    rng = jax.random.key(0) if rng is None else rng
    variables = dict(jax.jit(module.init)(rng, jnp.zeros(shape, jnp.float32)))
    variables.setdefault("batch_stats", {})  # the same structure for models without BN
    return variables


# Jitted: op by op, the random kernel compiles several small programs (0.9 s vs 0.4 s on CPU).
_lecun_normal = jax.jit(nn.initializers.lecun_normal(), static_argnums=(1, 2))


def init_head(module: Backbone, input_shape: Sequence[int], rng=None) -> dict:
    """Fresh parameters of the classifier head alone (LeCun-normal kernel, zero bias, as the
    Dense layer initialises them), without initialising the whole backbone."""
    kernel = variable_shapes(module, input_shape)["params"][HEAD_UNIT]["kernel"]
    rng = jax.random.key(0) if rng is None else rng
    return {"kernel": _lecun_normal(rng, kernel.shape, kernel.dtype),
            "bias": jnp.zeros(kernel.shape[-1:], kernel.dtype)}


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One row of the layer table: a Keras layer, in Keras's `model.layers` order."""

    index: int
    name: str                      # Keras layer name
    kind: str                      # conv, depthwise, batchnorm, dense, pooling, activation, ...
    keras_class: str               # e.g. 'Conv2D'
    unit: str                      # the unit it belongs to
    has_weights: bool
    variables: tuple[tuple[str, ...], ...]  # ('params', name, 'kernel'), ('batch_stats', ...)
    output_shape: tuple[int, ...]

    @property
    def param_paths(self) -> tuple[tuple[str, ...], ...]:
        return tuple(p[1:] for p in self.variables if p[0] == "params")


def _snake_case(name: str) -> str:
    """Keras's naming.to_snake_case (Keras derives automatic layer names from it)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def keras_auto_name(class_name: str, count: int) -> str:
    base = _snake_case(class_name)
    return base if count == 0 else f"{base}_{count}"


def layer_table(module: Backbone, input_shape: Sequence[int]) -> list[LayerRecord]:
    """The model's layers in Keras order, recorded from the module's own calls.

    `input_shape` is (H, W, C) or (N, H, W, C). Layers that Keras names automatically
    (`re_lu_3`, `activation_1`) are named the way a fresh Keras session names them.
    """
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    calls: list[tuple[str, L.KerasLayer, Any]] = []
    current_unit = [None]

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "enter_unit" and isinstance(context.module, Backbone):
            current_unit[0] = args[0]
        elif context.method_name == "__call__" and isinstance(context.module, L.KerasLayer):
            calls.append((current_unit[0], context.module, jax.tree.map(lambda a: a.shape, out)))
        return out

    def init():
        with nn.intercept_methods(interceptor):
            return module.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))

    variables = jax.eval_shape(init)
    _VARIABLE_SHAPES.setdefault((module, shape[1:]), variables)  # the same trace's by-product
    flat = traverse_util.flatten_dict(jax.tree.map(lambda a: a, dict(variables)))
    auto_counts: dict[str, int] = {}
    records = []
    for index, (unit, layer, out_shape) in enumerate(calls):
        cls = type(layer).__name__
        name = layer.name
        if re.fullmatch(rf"{cls}_\d+", name):  # named by Flax: use Keras's automatic name
            name = keras_auto_name(cls, auto_counts.get(cls, 0))
            auto_counts[cls] = auto_counts.get(cls, 0) + 1
        owned = tuple(p for p in flat if p[1:1 + len(layer.path)] == layer.path)
        records.append(LayerRecord(index, name, layer.kind, cls, unit, bool(owned), owned,
                                   tuple(out_shape)))
    return records
