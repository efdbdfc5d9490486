"""MobileNetV2 (keras.applications.MobileNetV2), layer for layer."""
from __future__ import annotations

from typing import ClassVar

from blockft_jax.models import layers as L
from blockft_jax.models.base import Backbone, correct_pad

BN = dict(epsilon=1e-3, momentum=0.999)

# (filters, stride, expansion) of blocks 0..16, as in Keras.
BLOCKS = ((16, 1, 1),
          (24, 2, 6), (24, 1, 6),
          (32, 2, 6), (32, 1, 6), (32, 1, 6),
          (64, 2, 6), (64, 1, 6), (64, 1, 6), (64, 1, 6),
          (96, 1, 6), (96, 1, 6), (96, 1, 6),
          (160, 2, 6), (160, 1, 6), (160, 1, 6),
          (320, 1, 6))


def make_divisible(v, divisor=8, min_value=None):
    """Keras's _make_divisible: round to a multiple of `divisor`, never down by over 10%."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class MobileNetV2(Backbone):
    width: float = 1.0  # Keras's alpha
    blocks: int | None = None  # keep only the first N inverted-residual blocks (tiny test models)
    preprocessing: ClassVar[str] = "tf"

    def units(self):
        units = [("stem", self._stem)]
        for block_id, (filters, stride, expansion) in enumerate(BLOCKS[:self.blocks]):
            units.append((f"block_{block_id}",
                          lambda x, train, b=block_id, f=filters, s=stride, e=expansion:
                          self._block(x, train, b, f, s, e)))
        units.append(("top", self._top))
        return units

    def _stem(self, x, train):
        x = self.conv(make_divisible(32 * self.width), 3, 2, "same", use_bias=False, name="Conv1")(x)
        x = L.BatchNormalization(**BN, name="bn_Conv1")(x, train)
        return L.ReLU(6.0, name="Conv1_relu")(x)

    def _block(self, inputs, train, block_id, filters, stride, expansion):
        in_channels = inputs.shape[-1]
        pointwise_filters = make_divisible(int(filters * self.width), 8)
        x = inputs
        prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
        if block_id:
            x = self.conv(expansion * in_channels, 1, padding="same", use_bias=False,
                          name=f"{prefix}expand")(x)
            x = L.BatchNormalization(**BN, name=f"{prefix}expand_BN")(x, train)
            x = L.ReLU(6.0, name=f"{prefix}expand_relu")(x)
        if stride == 2:
            x = L.ZeroPadding2D(correct_pad(x, 3), name=f"{prefix}pad")(x)
        x = self.depthwise(3, stride, "same" if stride == 1 else "valid", use_bias=False,
                           name=f"{prefix}depthwise")(x)
        x = L.BatchNormalization(**BN, name=f"{prefix}depthwise_BN")(x, train)
        x = L.ReLU(6.0, name=f"{prefix}depthwise_relu")(x)
        x = self.conv(pointwise_filters, 1, padding="same", use_bias=False,
                      name=f"{prefix}project")(x)
        x = L.BatchNormalization(**BN, name=f"{prefix}project_BN")(x, train)
        if in_channels == pointwise_filters and stride == 1:
            return L.Add(name=f"{prefix}add")([inputs, x])
        return x

    def _top(self, x, train):
        last = make_divisible(1280 * self.width, 8) if self.width > 1.0 else 1280
        x = self.conv(last, 1, use_bias=False, name="Conv_1")(x)
        x = L.BatchNormalization(**BN, name="Conv_1_bn")(x, train)
        return L.ReLU(6.0, name="out_relu")(x)
