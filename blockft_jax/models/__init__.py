"""The model zoo: Flax ports of Keras-applications backbones, picked by name.

    module = create("mobilenet_v2", num_classes=5, width=0.35)
    table = layer_table(module, (96, 96, 3))
"""
from __future__ import annotations

import dataclasses
import importlib

from blockft_jax.models.base import (HEAD_UNIT, Backbone, LayerRecord, init_head,
                                     init_variables, keras_auto_name, layer_table,
                                     variable_shapes)

@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A model of the zoo: where its Flax port lives and which Keras model it mirrors."""
    file: str          # the module under blockft_jax/models/
    cls: str           # the Flax class in it
    has_width: bool    # whether `width` (Keras's alpha) applies
    keras_name: str    # its keras.applications constructor


REGISTRY = {
    "vgg16": ModelEntry("vgg16", "VGG16", False, "VGG16"),
    "mobilenet_v1": ModelEntry("mobilenet_v1", "MobileNetV1", True, "MobileNet"),
    "mobilenet_v2": ModelEntry("mobilenet_v2", "MobileNetV2", True, "MobileNetV2"),
    "mobilenet_v3_small": ModelEntry("mobilenet_v3", "MobileNetV3Small", True, "MobileNetV3Small"),
    "mobilenet_v3_large": ModelEntry("mobilenet_v3", "MobileNetV3Large", True, "MobileNetV3Large"),
    "resnet50_v2": ModelEntry("resnet_v2", "ResNet50V2", False, "ResNet50V2"),
}
MODEL_NAMES = tuple(REGISTRY)


def model_class(name: str) -> type[Backbone]:
    if name not in REGISTRY:
        raise ValueError(f"Unknown model {name!r}. Available models: {', '.join(MODEL_NAMES)}.")
    entry = REGISTRY[name]
    return getattr(importlib.import_module(f"blockft_jax.models.{entry.file}"), entry.cls)


def create(name: str, *, num_classes: int | None = None, width: float = 1.0,
           **options) -> Backbone:
    """A Flax module for `name`. With `num_classes=None` it returns Keras's
    `include_top=False` feature map; with `num_classes=K` it adds global average pooling,
    optional dropout (`dropout_rate`) and a Dense head named `head`.

    `width` is Keras's `alpha` (ignored by VGG16 and ResNet50V2). Other options: `dtype`
    (compute dtype), `depthwise_impl` ('auto', 'native', 'shifted'), `conv_impl` ('auto',
    'native', 'matmul': how 1x1 convolutions run; 'auto' = matmul on CPU) and per-model ones
    (`depth_multiplier` for mobilenet_v1, `minimalistic` and `include_preprocessing` for the
    MobileNetV3s).
    """
    cls = model_class(name)
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for model {name!r}; "
                         f"valid options: {sorted(fields - {'num_classes', 'width'})}.")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}.")
    if REGISTRY[name].has_width:
        if not width > 0:
            raise ValueError(f"width (Keras's alpha) must be positive, got {width!r}.")
        options["width"] = float(width)
    return cls(num_classes=num_classes, **options)


__all__ = ["create", "layer_table", "variable_shapes", "init_variables", "init_head",
           "model_class", "Backbone", "LayerRecord", "HEAD_UNIT", "MODEL_NAMES", "REGISTRY",
           "ModelEntry",
           "keras_auto_name"]
