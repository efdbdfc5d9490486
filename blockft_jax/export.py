"""A saved model as a Keras 3 `.keras` file: Keras's own application model with these weights.

    python -m blockft_jax.export --model runs/x --out flowers.keras     # the search's winner

The file holds the `keras.applications` backbone (built as Keras builds it, include_top=False,
with the same width and options), global average pooling, dropout and a Dense layer `head`
ending in softmax, preceded by the model's preprocessing as built-in layers. So it takes raw
RGB images (0-255, uint8 or float) of the model's input size, classifies like
`blockft_jax.predict`, and `keras.saving.load_model` opens it without blockft_jax. Keras is an
optional extra: pip install -e '.[keras]'.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from flax import traverse_util

from blockft_jax import cli, models, predict
from blockft_jax.common.errors import UserError
from blockft_jax.inputs.weights import ALIASES, KERAS_VARIABLES

# Options that choose how the Flax model computes, not what: Keras has no use for them.
IMPLEMENTATION_OPTIONS = {"dtype", "depthwise_impl", "conv_impl"}
# Flax model options that are keras.applications constructor arguments of the same name.
KERAS_OPTIONS = {"mobilenet_v1": {"depth_multiplier"},
                 "mobilenet_v3_small": {"minimalistic", "include_preprocessing"},
                 "mobilenet_v3_large": {"minimalistic", "include_preprocessing"}}
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # as data.preprocess('caffe')


class ExportError(UserError, ValueError):
    """The saved model cannot be written as a Keras model; the message says why and what to
    do."""


def _import_keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")  # no TensorFlow needed
    try:
        import keras
    except ImportError:
        raise ExportError("Exporting needs Keras 3, which is not installed: "
                          "pip install -e '.[keras]'") from None
    if int(keras.__version__.split(".")[0]) < 3:
        raise ExportError(f"Exporting needs Keras 3, found Keras {keras.__version__}: "
                          "pip install -e '.[keras]'")
    return keras


def keras_arguments(meta: dict) -> dict:
    """The keras.applications constructor's arguments for a saved model's model.json."""
    spec = meta["model"]
    name, size = spec["name"], int(meta["input_size"])
    keras_name = models.REGISTRY[name].keras_name
    arguments = {"include_top": False, "weights": None, "input_shape": (size, size, 3)}
    if models.REGISTRY[name].has_width:
        arguments["alpha"] = float(spec.get("width", 1.0))
    for key, value in sorted((spec.get("options") or {}).items()):
        if value is None or key in IMPLEMENTATION_OPTIONS:
            continue
        if key not in KERAS_OPTIONS.get(name, ()):
            raise ExportError(f"Model option {key}={value!r} has no counterpart in "
                              f"keras.applications.{keras_name}, so this model cannot be "
                              "exported to Keras; only models with Keras's architecture can.")
        arguments[key] = value
    return arguments


def keras_model(model: predict.SavedModel):
    """The Keras model (functional, not compiled) with the saved model's weights."""
    meta, name, size = model.meta, model.meta["model"]["name"], model.input_size
    arguments = keras_arguments(meta)  # refuses what Keras cannot build before importing it
    keras = _import_keras()
    inputs = keras.Input((size, size, 3), name="image")
    x = _preprocessing(keras, model.preprocessing)(inputs)
    # Built on our input tensor, the application's layers join this one graph (one flat model).
    application = getattr(keras.applications, models.REGISTRY[name].keras_name)
    backbone = application(input_tensor=x, **arguments)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone.output)
    rate = float(meta["model"].get("dropout_rate") or 0.0)
    if rate > 0:
        x = keras.layers.Dropout(rate, name="head_dropout")(x)
    outputs = keras.layers.Dense(len(model.class_names), activation="softmax", name="head")(x)
    result = keras.Model(inputs, outputs, name=f"blockft_jax_{name}")
    _copy_weights(result, model)
    if bn_frozen(meta):  # fine-tuned on in Keras, its BN layers stay in inference mode
        for layer in result.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return result


def bn_frozen(meta: dict) -> bool:
    """Whether the saved model trained under the 'frozen' BatchNorm policy (settings.py)."""
    return (meta.get("setting") or {}).get("bn_policy") == "frozen"


def _preprocessing(keras, mode: str):
    """data.preprocess(mode) as built-in Keras layers, which any Keras can load."""
    if mode == "tf":
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess_tf")
    if mode == "raw":  # the model rescales itself (MobileNetV3), or wants raw pixels
        return keras.layers.Identity(name="preprocess_raw")
    if mode == "caffe":
        # RGB -> BGR and the ImageNet mean subtracted, as a fixed 1x1 convolution: output
        # channel j is input channel 2 - j (products by 1 and 0 are exact) plus -mean[j].
        layer = keras.layers.Conv2D(3, 1, name="preprocess_caffe", trainable=False)
        layer.build((None, None, None, 3))
        layer.set_weights([np.eye(3, dtype=np.float32)[::-1].reshape(1, 1, 3, 3),
                           -np.asarray(_CAFFE_MEAN_BGR, np.float32)])
        return layer
    raise ExportError(f"Unknown preprocessing mode {mode!r}; expected 'caffe', 'tf' or 'raw'.")


def _copy_weights(keras_model_, model: predict.SavedModel) -> None:
    """The inverse of weights.load_keras: every variable of the Flax model into the Keras
    layer of the same name, every Keras weight filled exactly once."""
    size = model.input_size
    filled = {id(w) for w in keras_model_.get_layer(_preprocess_layer(keras_model_)).weights}
    used = set()
    for record in models.layer_table(model.module, (size, size, 3)):
        if not record.has_weights:
            continue
        try:
            layer = keras_model_.get_layer(record.name)
        except ValueError:
            raise ExportError(f"Keras's model has no layer {record.name!r} "
                              f"({record.keras_class}) of the saved model.") from None
        mapping = dict(KERAS_VARIABLES[record.keras_class])
        for weight in layer.weights:
            keras_name = ALIASES.get(weight.name, weight.name)
            collection, flax_name = mapping.get(keras_name, (None, None))
            source = model.variables.get(collection, {}).get(record.name, {})
            if flax_name not in source:
                raise ExportError(f"Keras's layer {record.name!r} has {keras_name!r}, which the "
                                  "saved model lacks.")
            value = np.asarray(source[flax_name])
            used.add((collection, record.name, flax_name))
            if record.keras_class == "DepthwiseConv2D":
                value = value.reshape(weight.shape)  # (kh,kw,1,in*m) -> Keras's (kh,kw,in,m)
            if tuple(value.shape) != tuple(weight.shape):
                raise ExportError(f"Layer {record.name!r}, {keras_name!r}: the saved model has "
                                  f"shape {value.shape}, Keras's {tuple(weight.shape)}.")
            weight.assign(value)
            filled.add(id(weight))
    unfilled = [w.path for w in keras_model_.weights if id(w) not in filled]
    if unfilled:
        raise ExportError(f"Keras's model has weights the saved model lacks: {unfilled[:5]}.")
    unused = [path for path in traverse_util.flatten_dict(model.variables) if path not in used]
    if unused:
        raise ExportError(f"Keras's model has no place for {['/'.join(p) for p in unused[:5]]}.")


def _preprocess_layer(keras_model_) -> str:
    return next(layer.name for layer in keras_model_.layers
                if layer.name.startswith("preprocess_"))


def export(model_dir, out) -> Path:
    """Writes the saved model `model_dir` (a workdir: its winner; or WORKDIR/models/<strategy>)
    to `out` (.keras)."""
    out = Path(out).expanduser().absolute()
    if out.suffix != ".keras":
        raise ExportError(f"--out must end in .keras (Keras 3's model file), got {out.name!r}.")
    model = keras_model(predict.load(model_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.tmp{os.getpid()}.keras")  # Keras wants the suffix
    model.save(partial)
    os.replace(partial, out)  # a killed export never leaves half a file under the name
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m blockft_jax.export",
        description="Write a saved model as a Keras 3 .keras file (raw RGB 0-255 in, "
                    "softmax probabilities out).")
    parser.add_argument("--model", required=True,
                        help="a search's workdir (its winner: WORKDIR/models/best) or a saved "
                             "model's folder (WORKDIR/models/<strategy>)")
    parser.add_argument("--out", required=True, help="the .keras file to write")
    args = parser.parse_args(argv)
    try:
        out = export(args.model, args.out)
    except (ExportError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    cli.setup_logging()
    sys.exit(main())
