"""ResNet50V2 (keras.applications.ResNet50V2, include_top=False), layer for layer."""
from __future__ import annotations

from typing import ClassVar

from blockft_jax.models import layers as L
from blockft_jax.models.base import Backbone

BN = dict(epsilon=1.001e-5, momentum=0.99)

# (stack name, bottleneck filters, blocks, stride of the stack's last block), as in Keras.
STACKS = (("conv2", 64, 3, 2), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 1))


class ResNet50V2(Backbone):
    preprocessing: ClassVar[str] = "tf"

    def units(self):
        units = [("stem", self._stem)]
        for stack, filters, blocks, stride1 in STACKS:
            for i in range(1, blocks + 1):
                # Keras's stack_residual_blocks_v2: conv shortcut on block 1, stride on the last.
                units.append((f"{stack}_block{i}",
                              lambda x, train, n=f"{stack}_block{i}", f=filters,
                              s=stride1 if i == blocks else 1, c=i == 1:
                              self._block(x, train, n, f, s, c)))
        units.append(("top", self._top))
        return units

    def _stem(self, x, train):
        x = L.ZeroPadding2D(((3, 3), (3, 3)), name="conv1_pad")(x)
        x = self.conv(64, 7, 2, name="conv1_conv")(x)
        x = L.ZeroPadding2D(((1, 1), (1, 1)), name="pool1_pad")(x)
        return L.MaxPooling2D(3, strides=2, name="pool1_pool")(x)

    def _block(self, inputs, train, name, filters, stride, conv_shortcut):
        preact = L.BatchNormalization(**BN, name=f"{name}_preact_bn")(inputs, train)
        preact = L.Activation("relu", name=f"{name}_preact_relu")(preact)
        x = self.conv(filters, 1, use_bias=False, name=f"{name}_1_conv")(preact)
        x = L.BatchNormalization(**BN, name=f"{name}_1_bn")(x, train)
        x = L.Activation("relu", name=f"{name}_1_relu")(x)
        x = L.ZeroPadding2D(((1, 1), (1, 1)), name=f"{name}_2_pad")(x)
        x = self.conv(filters, 3, stride, use_bias=False, name=f"{name}_2_conv")(x)
        x = L.BatchNormalization(**BN, name=f"{name}_2_bn")(x, train)
        x = L.Activation("relu", name=f"{name}_2_relu")(x)
        # The shortcut is built first in Keras's code, but `model.layers` lists it here
        # (ordered by depth), just before `_3_conv`; calling it here keeps the table in order.
        if conv_shortcut:
            shortcut = self.conv(4 * filters, 1, stride, name=f"{name}_0_conv")(preact)
        elif stride > 1:
            shortcut = L.MaxPooling2D(1, strides=stride, name=None)(inputs)  # unnamed in Keras
        else:
            shortcut = inputs
        x = self.conv(4 * filters, 1, name=f"{name}_3_conv")(x)
        return L.Add(name=f"{name}_out")([shortcut, x])

    def _top(self, x, train):
        x = L.BatchNormalization(**BN, name="post_bn")(x, train)
        return L.Activation("relu", name="post_relu")(x)
