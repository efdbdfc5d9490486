"""VGG16 (keras.applications.VGG16, include_top=False), layer for layer."""
from __future__ import annotations

from typing import ClassVar

from blockft_jax.models import layers as L
from blockft_jax.models.base import Backbone

# (filters, convolutions) of block1..block5, as in Keras.
BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG16(Backbone):
    preprocessing: ClassVar[str] = "caffe"

    def units(self):
        return [(f"block{i}", lambda x, train, i=i, f=filters, n=convs: self._block(x, i, f, n))
                for i, (filters, convs) in enumerate(BLOCKS, start=1)]

    def _block(self, x, block_id, filters, convs):
        for c in range(1, convs + 1):
            x = self.conv(filters, 3, padding="same", activation="relu",
                          name=f"block{block_id}_conv{c}")(x)
        return L.MaxPooling2D(2, strides=2, name=f"block{block_id}_pool")(x)
