"""Keras weight files -> Flax variables, with h5py alone (no TensorFlow, no Keras).

Two formats are read:
  * legacy HDF5 (`.h5`): the format of the official keras-applications ImageNet files; layers
    are groups named like the Keras layers, listed in the root attribute `layer_names`.
  * Keras 3 (`.weights.h5`): groups `layers/<key>/vars/<i>`, where <key> is the layer's class
    in snake case, numbered in `model.layers` order (`conv2d`, `conv2d_1`, ...).
Conversion is strict: every backbone variable is filled exactly once, every array in the file is
used or explicitly skipped (the ImageNet classifier), and any mismatch names the layer, both
shapes and the file.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import h5py
import jax
import numpy as np
from flax import serialization, traverse_util

from blockft_jax.common import durable
from blockft_jax.common.errors import UserError
from blockft_jax.models import (HEAD_UNIT, Backbone, init_head, keras_auto_name, layer_table,
                                variable_shapes)

log = logging.getLogger(__name__)

# Keras variable names, in Keras's `layer.weights` order, -> Flax (collection, name).
KERAS_VARIABLES = {
    "Conv2D": (("kernel", ("params", "kernel")), ("bias", ("params", "bias"))),
    "DepthwiseConv2D": (("kernel", ("params", "kernel")), ("bias", ("params", "bias"))),
    "Dense": (("kernel", ("params", "kernel")), ("bias", ("params", "bias"))),
    "BatchNormalization": (("gamma", ("params", "scale")), ("beta", ("params", "bias")),
                           ("moving_mean", ("batch_stats", "mean")),
                           ("moving_variance", ("batch_stats", "var"))),
}
ALIASES = {"depthwise_kernel": "kernel"}  # tf.keras 2 names the depthwise kernel so

# Layers that exist only in Keras's include_top=True models: skipped when loading into a
# backbone (which has its own head, or none).
KERAS_TOP_LAYERS = ("predictions", "fc1", "fc2", "flatten", "conv_preds", "logits", "conv_2",
                    "reshape_1", "reshape_2", "dropout", "act_softmax", "probs")


class WeightsError(UserError, ValueError):
    """A Keras weights file does not fit the model it is loaded into."""


def _open(path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"Keras weights file not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"Could not read {path} as HDF5 ({e}). The file may be truncated "
                           "or not a Keras weights file; download it again.") from e


def _var_name(weight_name: str) -> str:
    name = weight_name.split("/")[-1].split(":")[0]
    return ALIASES.get(name, name)


def _legacy_layers(f: h5py.File, path) -> dict[str, dict[str, np.ndarray]]:
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in root.attrs:
        raise WeightsError(f"{path}: no 'layer_names' attribute; not a Keras weights file.")
    layers = {}
    for raw in root.attrs["layer_names"]:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        group = root[name]
        names = [n.decode() if isinstance(n, bytes) else str(n)
                 for n in group.attrs.get("weight_names", [])]
        try:
            layers[name] = {_var_name(n): np.asarray(group[n]) for n in names}
        except (KeyError, OSError) as e:
            raise WeightsError(f"{path}: layer {name!r} lists weights {names} that cannot be "
                               f"read ({e}); the file may be truncated.") from e
    return layers


def _keras3_layers(f: h5py.File, table, path) -> dict[str, dict[str, np.ndarray]]:
    """Re-keys a Keras 3 file by layer name, deriving each layer's class-based key from the
    layer table (Keras numbers keys per class in `model.layers` order)."""
    groups = f["layers"]
    counts: dict[str, int] = {"InputLayer": 1}
    layers, used = {}, {"input_layer"}
    for record in table:
        key = keras_auto_name(record.keras_class, counts.get(record.keras_class, 0))
        counts[record.keras_class] = counts.get(record.keras_class, 0) + 1
        if not record.has_weights:
            used.add(key)
            continue
        if key not in groups or "vars" not in groups[key]:
            continue  # reported as missing by the caller
        used.add(key)
        vars_ = groups[key]["vars"]
        names = [keras for keras, _ in KERAS_VARIABLES[record.keras_class]]
        arrays = [np.asarray(vars_[str(i)]) for i in range(len(vars_))]
        if len(arrays) > len(names):
            raise WeightsError(f"{path}: layer {record.name!r} ({key}) has {len(arrays)} "
                               f"arrays, expected at most {len(names)}.")
        layers[record.name] = dict(zip(names, arrays))  # Keras order: kernel, bias / BN's 4
    extra = [k for k in groups if k not in used and len(groups[k].get("vars", {})) > 0]
    for k in extra:  # classifier layers of an include_top file: keep them, skip them later
        layers[f"<{k}>"] = {str(i): np.asarray(v) for i, v in groups[k]["vars"].items()}
    return layers


def read_keras_file(path, module: Backbone, input_shape, table=None
                    ) -> dict[str, dict[str, np.ndarray]]:
    """{Keras layer name: {Keras variable name: array}} from either format. A Keras 3 file
    names layers by class counters, so the module's layer table (given or derived) names them."""
    with _open(path) as f:
        if "layers" in f and "vars" in f:
            table = layer_table(module, input_shape) if table is None else table
            return _keras3_layers(f, table, path)
        return _legacy_layers(f, path)


def load_keras(path, module: Backbone, input_shape: Sequence[int], *, skip_top: bool = True,
               rng: jax.Array | None = None) -> dict[str, Any]:
    """Converts a Keras weights file into `{'params', 'batch_stats'}` for `module`.

    `input_shape` is (H, W, C). Layers of Keras's ImageNet classifier present in the file are
    skipped when `skip_top`; the module's own `head` (if any) is freshly initialised from
    `rng`, and is the only variable not taken from the file.
    """
    shape = tuple(input_shape)
    table = layer_table(module, shape)
    file_layers = read_keras_file(path, module, shape, table)
    expected = traverse_util.flatten_dict(dict(variable_shapes(module, shape)))
    filled: dict[tuple[str, ...], np.ndarray] = {}

    for record in table:
        if not record.has_weights or record.unit == HEAD_UNIT:
            continue
        if record.name not in file_layers:
            raise WeightsError(
                f"{path}: layer {record.name!r} ({record.keras_class}) of "
                f"{type(module).__name__} has no weights in the file. Is this the file for "
                f"this model, width and options?")
        arrays = dict(file_layers.pop(record.name))
        for keras_name, (collection, flax_name) in KERAS_VARIABLES[record.keras_class]:
            target = (collection, record.name, flax_name)
            if target not in expected:
                if keras_name in arrays:
                    raise WeightsError(f"{path}: layer {record.name!r} has {keras_name!r} but "
                                       f"the model's layer has no {flax_name!r}.")
                continue
            if keras_name not in arrays:
                raise WeightsError(f"{path}: layer {record.name!r} lacks {keras_name!r} "
                                   f"(file has {sorted(arrays)}).")
            value = arrays.pop(keras_name)
            want = expected[target].shape
            if record.keras_class == "DepthwiseConv2D" and value.ndim == 4:
                kh, kw, cin, mult = value.shape
                value = value.reshape(kh, kw, 1, cin * mult)  # (kh,kw,in,m) -> grouped conv
            if value.shape != want:
                raise WeightsError(
                    f"{path}: shape mismatch in layer {record.name!r}, {keras_name!r}: file "
                    f"has {value.shape}, model expects {want}. Check the model name, width "
                    f"and options.")
            filled[target] = value.astype(expected[target].dtype)
        if arrays:
            raise WeightsError(f"{path}: layer {record.name!r} has unused arrays {sorted(arrays)}.")

    leftover = sorted(name for name, arrays in file_layers.items() if arrays)
    skippable = [n for n in leftover if n in KERAS_TOP_LAYERS or n.startswith("<")]
    if leftover and (not skip_top or skippable != leftover or len(leftover) > 4):
        raise WeightsError(f"{path}: the file has weights for layers the model lacks: "
                           f"{leftover[:10]}{' ...' if len(leftover) > 10 else ''}. Is this a "
                           f"file for another model?")
    if skippable:
        log.info("Skipped Keras classifier layers %s from %s", skippable, path)

    missing = [p for p in expected if p not in filled and p[1] != HEAD_UNIT]
    if missing:
        raise WeightsError(f"{path}: no value for {['/'.join(p) for p in missing[:5]]}.")
    if any(p[1] == HEAD_UNIT for p in expected):
        head = init_head(module, shape, rng)
        filled.update({("params", HEAD_UNIT, k): np.asarray(v) for k, v in head.items()})
    variables = traverse_util.unflatten_dict({p: jax.numpy.asarray(v) for p, v in filled.items()})
    variables.setdefault("batch_stats", {})  # same structure for models without BatchNorm
    return variables


# --- saving converted variables ---------------------------------------------------------------

def save_variables(path, variables) -> None:
    """Writes variables as flax msgpack, atomically (a crash never leaves half a file)."""
    durable.write_bytes(path, serialization.msgpack_serialize(
        jax.tree.map(np.asarray, dict(variables))))


def load_variables(path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())


# --- official ImageNet files ------------------------------------------------------------------

KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"
V3_NO_TOP_MD5 = {
    "large_224_0.75_float": "40af19a13ebea4e2ee0c676887f69a2e",
    "large_224_1.0_float": "07fb09a5933dd0c8eaafa16978110389",
    "large_minimalistic_224_1.0_float": "ec5221f64a2f6d1ef965a614bdae7973",
    "small_224_0.75_float": "ebdb5cc8e0b497cd13a7c275d475c819",
    "small_224_1.0_float": "d3e8ec802a04aa4fc771ee12a9a9b836",
    "small_minimalistic_224_1.0_float": "cde8136e733e811080d9fcd8a252f7e4",
}


def imagenet_url(name: str, width: float = 1.0, input_size: int = 224,
                 minimalistic: bool = False) -> tuple[str, str | None]:
    """(URL, md5 or None) of the keras-applications `include_top=False` ImageNet file, chosen
    the way keras.applications chooses it."""
    if name == "vgg16":
        return (KERAS_APPS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "6d6bbae143d832006294945121d1f1fc")
    if name == "resnet50_v2":
        return (KERAS_APPS + "resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "fac2f116257151a9d068a22e544a4917")
    if name == "mobilenet_v1":
        texts = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}
        if width not in texts:
            raise ValueError(f"ImageNet weights for mobilenet_v1 exist for width in "
                             f"{sorted(texts)}, not {width}.")
        rows = input_size if input_size in (128, 160, 192, 224) else 224
        return KERAS_APPS + f"mobilenet/mobilenet_{texts[width]}_{rows}_tf_no_top.h5", None
    if name == "mobilenet_v2":
        if width not in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4):
            raise ValueError(f"ImageNet weights for mobilenet_v2 exist for width in "
                             f"[0.35, 0.5, 0.75, 1.0, 1.3, 1.4], not {width}.")
        rows = input_size if input_size in (96, 128, 160, 192, 224) else 224
        return (KERAS_APPS + "mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_"
                f"{float(width)}_{rows}_no_top.h5", None)
    if name in ("mobilenet_v3_small", "mobilenet_v3_large"):
        kind = name.rsplit("_", 1)[1]
        key = f"{kind}{'_minimalistic' if minimalistic else ''}_224_{float(width)}_float"
        if key not in V3_NO_TOP_MD5:
            raise ValueError(f"No ImageNet weights for {name} at width {width} "
                             f"(minimalistic={minimalistic}); Keras has {sorted(V3_NO_TOP_MD5)}.")
        return (KERAS_APPS + f"mobilenet_v3/weights_mobilenet_v3_{key}_no_top_v2.h5",
                V3_NO_TOP_MD5[key])
    raise ValueError(f"No ImageNet weights known for model {name!r}.")


def cache_dir() -> Path:
    return Path(os.environ.get("BLOCKFT_JAX_CACHE", Path.home() / ".cache" / "blockft_jax"))


def _md5(path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_imagenet_file(name: str, width: float = 1.0, input_size: int = 224,
                        minimalistic: bool = False) -> Path:
    """Downloads (once) the official Keras file into the cache, checked whole: its md5 where
    Keras gives one, else its length and an HDF5 file that opens. Each download writes a
    temporary file of its own, renamed into place when whole: processes downloading at once
    (hosts sharing a cache) never write into one file, and none publishes half of one."""
    url, md5 = imagenet_url(name, width, input_size, minimalistic)
    target = cache_dir() / "keras" / url.rsplit("/", 1)[1]
    if target.exists() and _whole(target, md5):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.",
                                       suffix=".part")
    partial = Path(partial)
    try:
        log.info("Downloading %s", url)
        try:
            with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as got:
                length = got.headers.get("Content-Length")
                shutil.copyfileobj(got, out)
                out.flush()
                os.fsync(out.fileno())
        except (urllib.error.URLError, OSError) as e:
            raise WeightsError(
                f"Could not download ImageNet weights for {name} from {url} ({e}). Without "
                f"network, download that file elsewhere and place it at {target}, then run "
                f"again.") from e
        size = partial.stat().st_size
        if length is not None and size != int(length):
            raise WeightsError(f"Downloaded {url} but got {size:,} of its {int(length):,} "
                               f"bytes: the download was cut short. Try again.")
        if not _whole(partial, md5):
            raise WeightsError(f"Downloaded {url} but " + (
                f"its md5 differs from Keras's {md5}" if md5 else "it is not an HDF5 file "
                "h5py can open") + ": the download is corrupt. Try again.")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _whole(path: Path, md5: str | None) -> bool:
    """A Keras weights file in one piece: Keras's md5 where it gives one, else HDF5 that
    opens (MobileNet v1 and v2 files have no md5)."""
    if md5 is not None:
        return _md5(path) == md5
    try:
        with h5py.File(path, "r"):
            return True
    except OSError:
        return False


def imagenet_variables(name: str, module: Backbone, input_size: int = 224,
                       rng: jax.Array | None = None) -> dict[str, Any]:
    """ImageNet variables for `module` (made by models.create(name, ...)): downloaded,
    converted and cached under ~/.cache/blockft_jax (or $BLOCKFT_JAX_CACHE)."""
    width = getattr(module, "width", 1.0)
    minimalistic = getattr(module, "minimalistic", False)
    source = fetch_imagenet_file(name, width, input_size, minimalistic)
    shape = (input_size, input_size, 3)
    converted = cache_dir() / "converted" / f"{source.stem}.msgpack"
    if converted.exists():
        backbone = load_variables(converted)
    else:
        backbone = load_keras(source, module.clone(num_classes=None), shape)
        save_variables(converted, backbone)
    if module.num_classes is None:
        return backbone
    return with_fresh_head(module, backbone, shape, rng)


def with_fresh_head(module: Backbone, backbone: dict, input_shape, rng=None) -> dict:
    """Backbone variables from elsewhere + `module`'s own freshly initialised head; refuses
    variables that do not fit the module exactly."""
    shape = tuple(input_shape)[-3:]
    merged = {c: {k: v for k, v in backbone.get(c, {}).items() if k != HEAD_UNIT}
              for c in ("params", "batch_stats")}
    merged["params"][HEAD_UNIT] = init_head(module, shape, rng)
    expected = jax.tree.map(np.shape, variable_shapes(module, shape))
    expected = {c: dict(expected.get(c, {})) for c in ("params", "batch_stats")}
    if jax.tree.map(np.shape, merged) != expected:
        raise WeightsError("The stored variables do not fit this model (different model, "
                           "width or options?).")
    return merged

