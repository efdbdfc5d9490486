"""MobileNetV3Small and MobileNetV3Large (keras.applications), layer for layer.

Keras builds these with its own input scaling: with `include_preprocessing=True` (the default)
the model starts with a Rescaling layer and takes raw pixels in [0, 255]; with
`include_preprocessing=False` the caller must pass inputs already scaled to [-1, 1].
"""
from __future__ import annotations

from typing import ClassVar

from blockft_jax.models import layers as L
from blockft_jax.models.base import Backbone, correct_pad
from blockft_jax.models.mobilenet_v2 import make_divisible as _depth  # same as Keras's _depth

BN = dict(epsilon=1e-3, momentum=0.999)
SE_RATIO = 0.25

# Inverted residual blocks as Keras lists them: (expansion, filters, kernel, stride, se, act).
# kernel None: the model's kernel (5, or 3 when minimalistic); se True: squeeze-excite unless
# minimalistic; act None: the model's activation (hard-swish, or ReLU when minimalistic).
SMALL = ((1, 16, 3, 2, True, "relu"),
         (72.0 / 16, 24, 3, 2, False, "relu"),
         (88.0 / 24, 24, 3, 1, False, "relu"),
         (4, 40, None, 2, True, None),
         (6, 40, None, 1, True, None),
         (6, 40, None, 1, True, None),
         (3, 48, None, 1, True, None),
         (3, 48, None, 1, True, None),
         (6, 96, None, 2, True, None),
         (6, 96, None, 1, True, None),
         (6, 96, None, 1, True, None))
LARGE = ((1, 16, 3, 1, False, "relu"),
         (4, 24, 3, 2, False, "relu"),
         (3, 24, 3, 1, False, "relu"),
         (3, 40, None, 2, True, "relu"),
         (3, 40, None, 1, True, "relu"),
         (3, 40, None, 1, True, "relu"),
         (6, 80, 3, 2, False, None),
         (2.5, 80, 3, 1, False, None),
         (2.3, 80, 3, 1, False, None),
         (2.3, 80, 3, 1, False, None),
         (6, 112, 3, 1, True, None),
         (6, 112, 3, 1, True, None),
         (6, 160, None, 2, True, None),
         (6, 160, None, 1, True, None),
         (6, 160, None, 1, True, None))


def _relu(x):
    return L.ReLU()(x)  # unnamed in Keras: re_lu, re_lu_1, ...


def _hard_swish(x):
    return L.Activation("hard_swish")(x)  # unnamed in Keras: activation, activation_1, ...


def _hard_sigmoid(x):
    # Keras: layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0); the add and multiply are ops, not layers.
    return L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)


class _MobileNetV3(Backbone):
    """Inputs: raw pixels in [0, 255] when `include_preprocessing` (Keras's default), else
    pixels already scaled to [-1, 1] by the caller."""

    width: float = 1.0  # Keras's alpha
    minimalistic: bool = False  # 3x3 kernels, ReLU, no squeeze-excite
    include_preprocessing: bool = True  # Rescaling [0, 255] -> [-1, 1] inside the model
    preprocessing: ClassVar[str] = "raw"
    blocks: ClassVar[tuple] = ()

    def units(self):
        units = [("stem", self._stem)]
        for block_id, spec in enumerate(self.blocks):
            name = f"expanded_conv_{block_id}" if block_id else "expanded_conv"
            units.append((name, lambda x, train, b=block_id, s=spec: self._block(x, train, b, *s)))
        units.append(("top", self._top))
        return units

    def _activation(self, x):
        return _relu(x) if self.minimalistic else _hard_swish(x)

    def _stem(self, x, train):
        if self.include_preprocessing:
            x = L.Rescaling(scale=1.0 / 127.5, offset=-1.0)(x)
        x = self.conv(16, 3, 2, "same", use_bias=False, name="conv")(x)
        x = L.BatchNormalization(**BN, name="conv_bn")(x, train)
        return self._activation(x)

    def _block(self, inputs, train, block_id, expansion, filters, kernel, stride, se, act):
        kernel = kernel or (3 if self.minimalistic else 5)
        activation = _relu if act == "relu" else self._activation
        filters = _depth(filters * self.width)
        in_filters = inputs.shape[-1]
        expanded = _depth(in_filters * expansion)
        prefix = f"expanded_conv_{block_id}_" if block_id else "expanded_conv_"
        x = inputs
        if block_id:  # the first block has no expansion conv
            x = self.conv(expanded, 1, padding="same", use_bias=False, name=f"{prefix}expand")(x)
            x = L.BatchNormalization(**BN, name=f"{prefix}expand_bn")(x, train)
            x = activation(x)
        if stride == 2:
            x = L.ZeroPadding2D(correct_pad(x, kernel), name=f"{prefix}depthwise_pad")(x)
        x = self.depthwise(kernel, stride, "same" if stride == 1 else "valid", use_bias=False,
                           name=f"{prefix}depthwise")(x)
        x = L.BatchNormalization(**BN, name=f"{prefix}depthwise_bn")(x, train)
        x = activation(x)
        if se and not self.minimalistic:
            x = self._squeeze_excite(x, expanded, prefix)
        x = self.conv(filters, 1, padding="same", use_bias=False, name=f"{prefix}project")(x)
        x = L.BatchNormalization(**BN, name=f"{prefix}project_bn")(x, train)
        if stride == 1 and in_filters == filters:
            x = L.Add(name=f"{prefix}add")([inputs, x])
        return x

    def _squeeze_excite(self, inputs, filters, prefix):
        x = L.GlobalAveragePooling2D(keepdims=True, name=f"{prefix}squeeze_excite_avg_pool")(inputs)
        x = self.conv(_depth(filters * SE_RATIO), 1, padding="same",
                      name=f"{prefix}squeeze_excite_conv")(x)
        x = L.ReLU(name=f"{prefix}squeeze_excite_relu")(x)
        x = self.conv(filters, 1, padding="same", name=f"{prefix}squeeze_excite_conv_1")(x)
        x = _hard_sigmoid(x)
        return L.Multiply(name=f"{prefix}squeeze_excite_mul")([inputs, x])

    def _top(self, x, train):
        # Keras's `alpha > 1` rule widens only conv_2 of its own classifier (include_top=True),
        # which this backbone replaces with the shared head; conv_1 follows the last block.
        x = self.conv(_depth(x.shape[-1] * 6), 1, padding="same", use_bias=False,
                      name="conv_1")(x)
        x = L.BatchNormalization(**BN, name="conv_1_bn")(x, train)
        return self._activation(x)


class MobileNetV3Small(_MobileNetV3):
    blocks: ClassVar[tuple] = SMALL


class MobileNetV3Large(_MobileNetV3):
    blocks: ClassVar[tuple] = LARGE
