"""Flax counterparts of the Keras layers that the Keras-applications backbones use.

Each class is named like its Keras class and holds variables under Keras's meaning, in Flax's
naming (`kernel`, `bias`, `scale`, `mean`, `var`), so that a model built from them mirrors the
Keras model layer for layer and weight conversion is a walk over names. Layers without weights
(activations, pooling, padding, merges) are small modules too: the layer table is recorded from
module calls, and block segmentation splits at exactly these layers.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

# A BatchNorm's mode: a Python bool for the whole model (False: inference, True: batch
# statistics), or a mapping from BN layer name to a boolean array, so that which BN layers train
# is *data* of a compiled step rather than part of its structure.
TrainMode = bool | Mapping[str, Any]


class BatchModes(dict):
    """Per-BatchNorm modes (a TrainMode mapping) together with the batch's row weights (1 a
    real example, 0 padding), so that batch statistics are taken over the real rows only: the
    padded rows of an epoch's last batch must not shift them (Keras sees a short last batch)."""

    def __init__(self, modes: Mapping[str, Any], row_weights):
        super().__init__(modes)
        self.row_weights = row_weights

DEPTHWISE_IMPLS = ("auto", "native", "shifted")


def resolve_depthwise_impl(impl: str, platform: str | None = None) -> str:
    """'auto' picks shifted multiply-adds on CPU, where XLA's grouped convolution is slow
    (measured 11x forward, 6x in grad), and the native grouped convolution elsewhere.
    `platform`: the one compiled for (default: this machine's backend)."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl={impl!r}: expected one of {DEPTHWISE_IMPLS}.")
    if impl == "auto":
        return "shifted" if (platform or jax.default_backend()) == "cpu" else "native"
    return impl


CONV_IMPLS = ("auto", "native", "matmul")


def resolve_conv_impl(impl: str, platform: str | None = None) -> str:
    """How 1x1, stride-1 convolutions run. 'auto' picks a plain matmul over channels on CPU,
    where XLA runs it 2-3x faster forward and 3-7x faster in gradient than the same
    convolution (measured on MobileNet/ResNet shapes), and the native convolution elsewhere.
    `platform`: the one compiled for (default: this machine's backend)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={impl!r}: expected one of {CONV_IMPLS}.")
    if impl == "auto":
        return "matmul" if (platform or jax.default_backend()) == "cpu" else "native"
    return impl


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding for one spatial axis (the extra pixel goes after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _explicit_padding(x, kernel, strides, padding) -> list[tuple[int, int]]:
    if padding == "valid":
        return [(0, 0), (0, 0)]
    if padding == "same":
        return [same_padding(x.shape[i + 1], kernel[i], strides[i]) for i in range(2)]
    raise ValueError(f"padding={padding!r}: expected 'valid' or 'same'.")


ACTIVATIONS: dict[str, Callable] = {
    "linear": lambda x: x,
    "relu": nn.relu,
    "relu6": nn.relu6,
    "hard_swish": lambda x: x * nn.relu6(x + 3.0) * (1.0 / 6.0),
    "hard_sigmoid": lambda x: nn.relu6(x + 3.0) * (1.0 / 6.0),
    "sigmoid": nn.sigmoid,
    "softmax": nn.softmax,
    "swish": nn.swish,
}


def _activation(name: str | None) -> Callable:
    if name is None:
        return ACTIVATIONS["linear"]
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r}: expected one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


class KerasLayer(nn.Module):
    """Marker base: a module that stands for exactly one Keras layer."""

    kind: ClassVar[str] = "other"


class Conv2D(KerasLayer):
    kind: ClassVar[str] = "conv"
    features: int
    kernel_size: int | Sequence[int] = 1
    strides: int | Sequence[int] = 1
    padding: str = "valid"
    use_bias: bool = True
    activation: str | None = None
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, s = _pair(self.kernel_size), _pair(self.strides)
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*k, x.shape[-1], self.features), jnp.float32)
        if k == (1, 1) and s == (1, 1) and resolve_conv_impl(self.impl) == "matmul":
            # Any padding of a 1x1 stride-1 convolution is empty: a matmul over channels.
            y = x.reshape(-1, x.shape[-1]).astype(self.dtype) @ kernel[0, 0].astype(self.dtype)
            y = y.reshape(*x.shape[:-1], self.features)
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype), kernel.astype(self.dtype), s,
                _explicit_padding(x, k, s, self.padding),
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                               jnp.float32).astype(self.dtype)
        return _activation(self.activation)(y)


class DepthwiseConv2D(KerasLayer):
    """Keras DepthwiseConv2D. The kernel is stored as Flax's grouped convolution wants it,
    (kh, kw, 1, in * multiplier); Keras keeps (kh, kw, in, multiplier), same element order."""

    kind: ClassVar[str] = "depthwise"
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: str = "valid"
    depth_multiplier: int = 1
    use_bias: bool = True
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, s = _pair(self.kernel_size), _pair(self.strides)
        channels = x.shape[-1] * self.depth_multiplier
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*k, 1, channels), jnp.float32).astype(self.dtype)
        pads = _explicit_padding(x, k, s, self.padding)
        x = x.astype(self.dtype)
        if resolve_depthwise_impl(self.impl) == "native":
            y = jax.lax.conv_general_dilated(
                x, kernel, s, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=x.shape[-1])
        else:
            y = _depthwise_shifted(x, kernel, s, pads, self.depth_multiplier)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (channels,),
                               jnp.float32).astype(self.dtype)
        return y


def _depthwise_shifted(x, kernel, strides, pads, multiplier):
    """Depthwise convolution as kh*kw shifted, strided multiply-adds (fast on XLA:CPU)."""
    if multiplier > 1:
        x = jnp.repeat(x, multiplier, axis=-1)  # channel c*m + j reads input channel c
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    y = None
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]
            term = patch * kernel[i, j, 0]
            y = term if y is None else y + term
    return y


class BatchNormalization(KerasLayer):
    """Keras BatchNormalization over the channel axis, with Keras's update rule
    moving = moving * momentum + batch * (1 - momentum)."""

    kind: ClassVar[str] = "batchnorm"
    epsilon: float = 1e-3
    momentum: float = 0.99

    @nn.compact
    def __call__(self, x, train: TrainMode = False):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        mode = train.get(self.name, False) if isinstance(train, Mapping) else train
        x32 = x.astype(jnp.float32)

        if mode is False or self.is_initializing():
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            row_weights = getattr(train, "row_weights", None)
            if row_weights is None:
                batch_mean = jnp.mean(x32, axes)
                batch_var = jnp.mean(jnp.square(x32 - batch_mean), axes)
            else:  # a weighted mean over real rows; padded rows (weight 0) count for nothing
                w = row_weights.astype(jnp.float32).reshape(-1, *([1] * (x.ndim - 1)))
                count = jnp.maximum(jnp.sum(w) * (x32.size // (x32.shape[0] * c)), 1.0)
                batch_mean = jnp.sum(x32 * w, axes) / count
                batch_var = jnp.sum(jnp.square(x32 - batch_mean) * w, axes) / count
            # Exposed for BN recalibration (pretrained.recalibrate_bn); free unless asked for.
            self.sow("bn_batch_stats", "mean", batch_mean, reduce_fn=lambda _, b: b)
            self.sow("bn_batch_stats", "var", batch_var, reduce_fn=lambda _, b: b)
            m = self.momentum

            def moved(old, new):
                return old * m + new * (1.0 - m)

            if mode is True:
                mean, var = batch_mean, batch_var
                ra_mean.value = moved(ra_mean.value, jax.lax.stop_gradient(batch_mean))
                ra_var.value = moved(ra_var.value, jax.lax.stop_gradient(batch_var))
            else:  # a traced flag: select, so frozen statistics stay bitwise unchanged
                mean = jnp.where(mode, batch_mean, ra_mean.value)
                var = jnp.where(mode, batch_var, ra_var.value)
                ra_mean.value = jnp.where(
                    mode, moved(ra_mean.value, jax.lax.stop_gradient(batch_mean)), ra_mean.value)
                ra_var.value = jnp.where(
                    mode, moved(ra_var.value, jax.lax.stop_gradient(batch_var)), ra_var.value)
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        return (x32 * inv + (bias - mean * inv)).astype(x.dtype)


class Dense(KerasLayer):
    kind: ClassVar[str] = "dense"
    features: int
    use_bias: bool = True
    activation: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (x.shape[-1], self.features), jnp.float32)
        y = x.astype(self.dtype) @ kernel.astype(self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                               jnp.float32).astype(self.dtype)
        return _activation(self.activation)(y)


class ReLU(KerasLayer):
    kind: ClassVar[str] = "activation"
    max_value: float | None = None

    def __call__(self, x):
        y = nn.relu(x)
        return y if self.max_value is None else jnp.minimum(y, self.max_value)


class Activation(KerasLayer):
    kind: ClassVar[str] = "activation"
    activation: str = "relu"

    def __call__(self, x):
        return _activation(self.activation)(x)


class ZeroPadding2D(KerasLayer):
    kind: ClassVar[str] = "padding"
    padding: Sequence[Sequence[int]] = ((1, 1), (1, 1))

    def __call__(self, x):
        (t, b), (l, r) = self.padding
        return jnp.pad(x, [(0, 0), (t, b), (l, r), (0, 0)])


class MaxPooling2D(KerasLayer):
    kind: ClassVar[str] = "pooling"
    pool_size: int | Sequence[int] = 2
    strides: int | Sequence[int] | None = None
    padding: str = "valid"

    def __call__(self, x):
        k = _pair(self.pool_size)
        s = _pair(self.strides) if self.strides is not None else k
        pads = _explicit_padding(x, k, s, self.padding)
        return nn.max_pool(x, k, s, padding=pads)


class GlobalAveragePooling2D(KerasLayer):
    kind: ClassVar[str] = "pooling"
    keepdims: bool = False

    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2), keepdims=self.keepdims)


class Add(KerasLayer):
    kind: ClassVar[str] = "add"

    def __call__(self, inputs):
        out = inputs[0]
        for t in inputs[1:]:
            out = out + t
        return out


class Multiply(KerasLayer):
    kind: ClassVar[str] = "multiply"

    def __call__(self, inputs):
        out = inputs[0]
        for t in inputs[1:]:
            out = out * t
        return out


class Rescaling(KerasLayer):
    kind: ClassVar[str] = "rescaling"
    scale: float = 1.0
    offset: float = 0.0

    def __call__(self, x):
        return x * self.scale + self.offset


class Dropout(KerasLayer):
    kind: ClassVar[str] = "dropout"
    rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: TrainMode = False):
        training = bool(train) if not isinstance(train, Mapping) else True
        return nn.Dropout(self.rate, deterministic=not training or self.rate == 0.0)(x)
