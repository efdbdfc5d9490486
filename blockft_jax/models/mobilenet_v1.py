"""MobileNet (keras.applications.MobileNet, "V1"), layer for layer."""
from __future__ import annotations

from typing import ClassVar

from blockft_jax.models import layers as L
from blockft_jax.models.base import Backbone

# Keras's MobileNet leaves BatchNormalization at its defaults (momentum 0.99), unlike V2/V3.
BN = dict(epsilon=1e-3, momentum=0.99)

# (pointwise filters, stride) of depthwise-separable blocks 1..13, as in Keras.
BLOCKS = ((64, 1),
          (128, 2), (128, 1),
          (256, 2), (256, 1),
          (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
          (1024, 2), (1024, 1))


class MobileNetV1(Backbone):
    width: float = 1.0  # Keras's alpha
    depth_multiplier: int = 1  # channels out of each depthwise conv per input channel
    preprocessing: ClassVar[str] = "tf"

    def units(self):
        units = [("stem", self._stem)]
        for block_id, (filters, stride) in enumerate(BLOCKS, start=1):
            units.append((f"conv_block_{block_id}",
                          lambda x, train, b=block_id, f=filters, s=stride:
                          self._block(x, train, b, f, s)))
        return units

    def _stem(self, x, train):
        x = self.conv(int(32 * self.width), 3, 2, "same", use_bias=False, name="conv1")(x)
        x = L.BatchNormalization(**BN, name="conv1_bn")(x, train)
        return L.ReLU(6.0, name="conv1_relu")(x)

    def _block(self, x, train, block_id, filters, stride):
        if stride == 2:  # V1 pads bottom/right only, whatever the input size (no correct_pad)
            x = L.ZeroPadding2D(((0, 1), (0, 1)), name=f"conv_pad_{block_id}")(x)
        x = self.depthwise(3, stride, "same" if stride == 1 else "valid", use_bias=False,
                           depth_multiplier=self.depth_multiplier, name=f"conv_dw_{block_id}")(x)
        x = L.BatchNormalization(**BN, name=f"conv_dw_{block_id}_bn")(x, train)
        x = L.ReLU(6.0, name=f"conv_dw_{block_id}_relu")(x)
        x = self.conv(int(filters * self.width), 1, padding="same", use_bias=False,
                      name=f"conv_pw_{block_id}")(x)
        x = L.BatchNormalization(**BN, name=f"conv_pw_{block_id}_bn")(x, train)
        return L.ReLU(6.0, name=f"conv_pw_{block_id}_relu")(x)
