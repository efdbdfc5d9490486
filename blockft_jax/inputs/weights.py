"""Keras weight files -> Flax variables, with h5py alone (no TensorFlow, no Keras).

Three containers are read:
  * legacy HDF5 (`.h5`): the format of the official keras-applications ImageNet files and of
    `model.save("x.h5")`; layers are groups named like the Keras layers, listed in the
    attribute `layer_names` (of `model_weights/` in a full-model file). A model nested as a
    layer is one group holding all its weights (its inner models' too), named
    `<layer>/<variable>`.
  * Keras 3 (`.weights.h5`): groups `layers/<key>/vars/<i>`, where <key> is the layer's class
    in snake case, numbered in `model.layers` order (`conv2d`, `conv2d_1`, ...); a nested
    model has a `layers/` group of its own.
  * Keras 3 `.keras`: a zip archive holding such a `model.weights.h5`.
The backbone is found by its layers, not by any name the file gives it: the file's top level
(an application saved alone) or the model nested in it, at any depth, that holds every weighted
layer of the module (a transfer model's backbone). What the file holds besides is skipped and
logged in one line. Conversion is strict: every backbone variable is filled exactly once, every
array of the backbone's model is used or explicitly skipped (the ImageNet classifier), and any
mismatch names the layer, both shapes and the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Sequence

import h5py
import jax
import numpy as np
from flax import serialization, traverse_util

from blockft_jax.common import durable
from blockft_jax.common.errors import UserError
from blockft_jax.models import (HEAD_UNIT, Backbone, LayerRecord, init_head, keras_auto_name,
                                layer_table, variable_shapes)

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
KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"  # the weights inside a Keras 3 .keras zip

Arrays = dict[str, np.ndarray]  # one layer's arrays by Keras variable name


class WeightsError(UserError, ValueError):
    """A Keras weights file does not fit the model it is loaded into."""


@dataclasses.dataclass
class StoredModel:
    """A model in a Keras file: the file's top level, or a model nested in it as a layer."""
    label: str | None          # the nested model's name (or place in the file); None: top level
    layers: dict[str, Arrays]  # its own layers' arrays, by Keras layer name

    def weighted(self) -> list[str]:
        return [name for name, arrays in self.layers.items() if arrays]


@dataclasses.dataclass
class KerasFile:
    models: list[StoredModel]  # the top level first, then the nested models, depth first
    other: dict[str, int]     # state beside the layers (the optimizer's): arrays per group


def _open(path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"Keras weights file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            return h5py.File(io.BytesIO(_archive_weights(path)), "r")
        return h5py.File(path, "r")
    except OSError as e:
        raise WeightsError(f"Could not read {path} as HDF5 or a .keras archive ({e}). The file "
                           "may be truncated or not a Keras weights file; download it again."
                           ) from e


def _archive_weights(path: Path) -> bytes:
    """The HDF5 weights inside a Keras 3 `.keras` archive (a zip, with config.json)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(KERAS_ARCHIVE_WEIGHTS)
    except KeyError:
        raise WeightsError(f"{path} is a zip archive without {KERAS_ARCHIVE_WEIGHTS}: not a "
                           "Keras 3 .keras file (or one saved with sharded weights).") from None
    except zipfile.BadZipFile as e:
        raise WeightsError(f"Could not read {path} as a .keras archive ({e}). The file may be "
                           "truncated; save or download it again.") from e


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _var_name(weight_name: str) -> str:
    name = weight_name.split("/")[-1].split(":")[0]
    return ALIASES.get(name, name)


def _array_count(group: h5py.Group) -> int:
    count = 0

    def visit(_, item):
        nonlocal count
        count += isinstance(item, h5py.Dataset)

    group.visititems(visit)
    return count


# --- legacy HDF5 ------------------------------------------------------------------------------

def _legacy_file(f: h5py.File, path) -> KerasFile:
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in root.attrs:
        raise WeightsError(f"{path}: no 'layer_names' attribute; not a Keras weights file.")
    configs = _layer_configs(f)
    top, nested = {}, []
    for name in _strings(root.attrs["layer_names"]):
        layers = _legacy_group(root[name], name, path)
        if len(layers) > 1:  # weights of several layers: a nested model's group
            owners = _innermost_models(configs.get(name, {}), name)
            nested += _split_by_model(name, layers, owners)
        else:
            top[name] = next(iter(layers.values()), {})
    other = {} if root is f else {key: _array_count(group) for key, group in f.items()
                                  if key != "model_weights" and isinstance(group, h5py.Group)}
    return KerasFile([StoredModel(None, top), *nested], other)


def _legacy_group(group: h5py.Group, name: str, path) -> dict[str, Arrays]:
    """A layer group's arrays by layer: a weight named `<layer>/<variable>` belongs to <layer>
    (one of a nested model's layers), one named without a layer to the group's own layer."""
    names = _strings(group.attrs.get("weight_names", []))
    layers: dict[str, Arrays] = {}
    try:
        for weight in names:
            layer = weight.rsplit("/", 1)[0] if "/" in weight else name
            layers.setdefault(layer, {})[_var_name(weight)] = np.asarray(group[weight])
    except (KeyError, OSError) as e:
        raise WeightsError(f"{path}: layer {name!r} lists weights {names} that cannot be "
                           f"read ({e}); the file may be truncated.") from e
    return layers


def _layer_configs(f: h5py.File) -> dict[str, dict]:
    """The saved model's layers' configs by name, from a full-model file's `model_config`
    (JSON); {} in a weights-only file."""
    raw = f.attrs.get("model_config")
    if raw is None:
        return {}
    config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    return {layer.get("config", {}).get("name"): layer
            for layer in config.get("config", {}).get("layers", [])}


def _innermost_models(layer_config: dict, name: str) -> dict[str, str]:
    """{layer name: the innermost model that has it} for model `name` and the models nested
    in it, from its config."""
    owners = {}
    for inner in layer_config.get("config", {}).get("layers", []):
        inner_name = inner.get("config", {}).get("name")
        owners[inner_name] = name
        owners.update(_innermost_models(inner, inner_name))
    return owners


def _split_by_model(name: str, layers: dict[str, Arrays], owners: dict[str, str]
                    ) -> list[StoredModel]:
    """A nested model's group holds its inner models' weights too: each layer goes to the
    innermost model that has it (all to `name` when the file has no config)."""
    split: dict[str, dict[str, Arrays]] = {}
    for layer, arrays in layers.items():
        split.setdefault(owners.get(layer) or name, {})[layer] = arrays
    return [StoredModel(label, model_layers) for label, model_layers in split.items()]


# --- Keras 3 ----------------------------------------------------------------------------------

def _keras3_file(f: h5py.File, table, path) -> KerasFile:
    other = {key: _array_count(group) for key, group in f.items()
             if key not in ("layers", "vars") and isinstance(group, h5py.Group)}
    return KerasFile(_keras3_models(f, table, path, None), other)


def _keras3_models(group: h5py.Group, table, path, label) -> list[StoredModel]:
    """`group`'s model and the models nested in it (layer groups with `layers` of their own),
    depth first."""
    found = [StoredModel(label, _keras3_layers(group, table, path))]
    for child in group["layers"].values():
        if "layers" in child:
            found += _keras3_models(child, table, path, _stored_name(child) or child.name)
    return found


def _stored_name(layer_group: h5py.Group) -> str | None:
    """The layer's name, which recent Keras 3 versions store beside its variables."""
    name = layer_group["vars"].attrs.get("name") if "vars" in layer_group else None
    return None if name is None else _strings([name])[0]


def _keras3_layers(group: h5py.Group, table, path) -> dict[str, Arrays]:
    """Re-keys one model's layers by layer name, deriving each layer's class-based key from
    the layer table (Keras numbers keys per class in `model.layers` order); where Keras stored
    the layer's name, it must agree."""
    groups = group["layers"]
    counts: dict[str, int] = {"InputLayer": 1}
    layers, used = {}, {"input_layer"}
    for record in table:
        key = keras_auto_name(record.keras_class, counts.get(record.keras_class, 0))
        counts[record.keras_class] = counts.get(record.keras_class, 0) + 1
        if record.unit == HEAD_UNIT:
            continue  # the module's own head: never taken from a file
        if not record.has_weights:
            used.add(key)
            continue
        if key not in groups or not len(groups[key].get("vars", {})) or \
                _stored_name(groups[key]) not in (None, record.name):
            continue  # not this model's layer; reported by the caller if it is the backbone
        used.add(key)
        vars_ = groups[key]["vars"]
        names = [keras for keras, _ in KERAS_VARIABLES[record.keras_class]]
        arrays = [np.asarray(vars_[str(i)]) for i in range(len(vars_))]
        if len(arrays) > len(names):
            raise WeightsError(f"{path}: layer {record.name!r} ({key}) has {len(arrays)} "
                               f"arrays, expected at most {len(names)}.")
        layers[record.name] = dict(zip(names, arrays))  # Keras order: kernel, bias / BN's 4
    for key, layer_group in groups.items():  # others, e.g. the classifier of include_top
        if key not in used and len(layer_group.get("vars", {})) > 0:
            layers[f"<{_stored_name(layer_group) or key}>"] = {
                str(i): np.asarray(v) for i, v in layer_group["vars"].items()}
    return layers


def read_keras_file(path, module: Backbone, input_shape, table=None) -> KerasFile:
    """The models a Keras file holds (top level and nested), each with its layers' arrays by
    Keras layer name. A Keras 3 file names layers by class counters, so the module's layer
    table (given or derived) names them."""
    with _open(path) as f:
        if "layers" in f and "vars" in f:
            table = layer_table(module, input_shape) if table is None else table
            return _keras3_file(f, table, path)
        return _legacy_file(f, path)


# --- conversion -------------------------------------------------------------------------------

def _find_backbone(keras_file: KerasFile, wanted: set[str], path, model_name: str) -> StoredModel:
    """The model in the file holding every weighted layer of the backbone: the top level (an
    application saved alone) or a model nested in it (a transfer model's backbone)."""
    holding = [m for m in keras_file.models if wanted <= set(m.weighted())]
    if len(holding) == 1:
        return holding[0]
    if holding:
        raise WeightsError(
            f"{path} holds {len(holding)} {model_name} backbones "
            f"({', '.join(repr(m.label) for m in holding)}); save the one to start from "
            f"alone, e.g. model.get_layer(name).save_weights('backbone.weights.h5').")
    raise WeightsError(
        f"{path} holds no {model_name} backbone ({len(wanted)} weighted layers): it holds "
        f"{_contents(keras_file.models, wanted)}. Is it a file for another model, or for other "
        f"options?")


def _contents(models: list[StoredModel], wanted: set[str]) -> str:
    """What a file holds, for an error: each model with how many of the backbone's layers
    it has; a few top-level layers (a transfer model's head) by name."""
    parts = []
    for model in models[1:] + models[:1]:  # the nested models first: one is meant
        held = model.weighted()
        if model.label is None and len(held) <= 3:
            parts += [f"{name.strip('<>')!r} (1 layer)" for name in held]
            continue
        count = f"{len(held)} weighted layer{'s' * (len(held) != 1)}"
        lacking = sorted(wanted.difference(held))
        match = f"{len(wanted) - len(lacking)} of the {len(wanted)} expected" + (
            f", lacking {', '.join(map(repr, lacking))}" if len(lacking) <= 3 else "")
        parts.append(f"{model.label!r} ({count}, {match})" if model.label is not None
                     else f"{count} at its top level ({match})")
    return ", ".join(parts) or "no weights"


def _convert_layer(record: LayerRecord, arrays: Arrays, expected: dict, source: str
                   ) -> dict[tuple[str, ...], np.ndarray]:
    """One Keras layer's arrays as the module's variables: names, layout and shapes checked,
    each array used once."""
    arrays = dict(arrays)
    filled = {}
    for keras_name, (collection, flax_name) in KERAS_VARIABLES[record.keras_class]:
        target = (collection, record.name, flax_name)
        if target not in expected:
            if keras_name in arrays:
                raise WeightsError(f"{source}: layer {record.name!r} has {keras_name!r} but "
                                   f"the model's layer has no {flax_name!r}.")
            continue
        if keras_name not in arrays:
            raise WeightsError(f"{source}: layer {record.name!r} lacks {keras_name!r} "
                               f"(file has {sorted(arrays)}).")
        value = arrays.pop(keras_name)
        want = expected[target].shape
        if record.keras_class == "DepthwiseConv2D" and value.ndim == 4:
            kh, kw, cin, mult = value.shape
            value = value.reshape(kh, kw, 1, cin * mult)  # (kh,kw,in,m) -> grouped conv
        if value.shape != want:
            raise WeightsError(
                f"{source}: shape mismatch in layer {record.name!r}, {keras_name!r}: file "
                f"has {value.shape}, model expects {want}. Check the model name, width "
                f"and options.")
        filled[target] = value.astype(expected[target].dtype)
    if arrays:
        raise WeightsError(f"{source}: layer {record.name!r} has unused arrays {sorted(arrays)}.")
    return filled


def _skip_the_rest(keras_file: KerasFile, backbone: StoredModel, used: set[str], skip_top: bool,
                   source: str) -> None:
    """Checks, then logs in one line, what the file holds besides the backbone. Beside the
    backbone in its own model, at most Keras's ImageNet classifier (more is another model,
    e.g. a deeper ResNet); around it, anything (a transfer model's pooling and head)."""
    extra = [name for name in backbone.weighted() if name not in used]
    around = [name for model in keras_file.models if model is not backbone
              for name in model.weighted()]
    classifier = len(extra) <= 4 and all(n in KERAS_TOP_LAYERS or n.startswith("<")
                                         for n in extra)
    if not classifier:
        unwanted = extra
    elif not skip_top:
        unwanted = extra + around
    else:
        unwanted = []
    if unwanted:
        raise WeightsError(f"{source}: the file has weights for layers the model lacks: "
                           f"{unwanted[:10]}{' ...' if len(unwanted) > 10 else ''}. Is this a "
                           f"file for another model?")
    skipped = [name.strip("<>") for name in extra + around]
    skipped += [f"{key} ({count} arrays)" for key, count in keras_file.other.items() if count]
    if skipped:
        log.info("Took the backbone from %s; skipped the rest: %s", source, ", ".join(skipped))


def load_keras(path, module: Backbone, input_shape: Sequence[int], *, skip_top: bool = True,
               rng: jax.Array | None = None) -> dict[str, Any]:
    """Converts a Keras weights file into `{'params', 'batch_stats'}` for `module`.

    `input_shape` is (H, W, C). The file is a legacy `.h5`, a `.weights.h5` or a `.keras`
    archive, of the application alone or of a model it is nested in (a transfer model). When
    `skip_top`, the layers of Keras's ImageNet classifier and the layers around a nested
    backbone are skipped; without, the file must hold the backbone alone. The module's own
    `head` (if any) is freshly initialised from `rng`, and is the only variable not taken from
    the file.
    """
    shape = tuple(input_shape)
    table = layer_table(module, shape)
    records = [r for r in table if r.has_weights and r.unit != HEAD_UNIT]
    keras_file = read_keras_file(path, module, shape, table)
    backbone = _find_backbone(keras_file, {r.name for r in records}, path, type(module).__name__)
    source = str(path) if backbone.label is None else f"{path} (nested model {backbone.label!r})"
    expected = traverse_util.flatten_dict(dict(variable_shapes(module, shape)))
    filled: dict[tuple[str, ...], np.ndarray] = {}
    for record in records:
        filled.update(_convert_layer(record, backbone.layers[record.name], expected, source))
    _skip_the_rest(keras_file, backbone, {r.name for r in records}, skip_top, source)

    missing = [p for p in expected if p not in filled and p[1] != HEAD_UNIT]
    if missing:
        raise WeightsError(f"{source}: no value for {['/'.join(p) for p in missing[:5]]}.")
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

