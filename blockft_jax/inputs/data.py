"""Datasets in memory, Keras preprocessing and augmentation.

    ds = load_dataset("beans", image_size=224)               # decoded and resized once, cached
    for batch in batches(ds.train, 64, shuffle_rng=np.random.default_rng(0)):
        x = preprocess(augment(rng, batch.images, flip=True, crop=True), "tf")   # on device, jitted

(The engine places the batches on the devices: engine/train.py's DeviceSplit and its steps.)

Datasets are any TFDS image-classification dataset, a folder of images (one subfolder per
class) or scikit-learn's digits. They are small enough (tf_flowers: 3,670 images) that each
split is one uint8 array in host memory: decoding and resizing happen once, never per epoch,
and batches are plain numpy gathers.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import inspect
import io
import itertools
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from blockft_jax.common.errors import UserError

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """A data problem the user can fix (unknown dataset, missing download, bad option, empty
    class folder, too little memory, ...); the message says what was wrong and what to do."""


@dataclasses.dataclass
class Split:
    images: np.ndarray  # uint8 (N, H, W, 3), RGB
    labels: np.ndarray  # int32 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class Dataset:
    train: Split
    validation: Split
    test: Split
    class_names: list[str]
    name: str
    # Files that were left out because they are not readable images: (path, reason).
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass
class Batch:
    images: np.ndarray | jax.Array  # (batch_size, H, W, 3) uint8, always full size
    labels: np.ndarray | jax.Array  # (batch_size,) int32
    mask: np.ndarray | jax.Array    # (batch_size,) float32: 1 real example, 0 padding


PARTS = ("train", "validation", "test")
LOCAL_DATASETS = ("image_folder", "digits")  # everything else is a TFDS name


@dataclasses.dataclass
class _Loaded:
    """What a loader returns: (images, labels) for 'train' and for any of 'validation' and
    'test' that the source itself provides; the rest is carved from train."""
    parts: dict[str, tuple[np.ndarray, np.ndarray]]
    class_names: list[str]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------- loading

def load_dataset(name: str, *, image_size: int, data_dir: str | None = None,
                 splits=(0.7, 0.15, 0.15), seed: int = 0, **options) -> Dataset:
    """Loads `name`, resized to image_size x image_size (RGB), as train/validation/test.

    `name` is any TFDS image-classification dataset ('tf_flowers', 'beans', 'cats_vs_dogs',
    'smallnorb', ...), 'image_folder' or 'digits'. A dataset's own validation and test splits
    are used when it has them; what it lacks is carved from its train split, stratified by
    class and seeded by `seed`: each class gives round(fraction x class size) examples.
    `splits` gives the fractions (train, validation, test). With train only, validation and
    test take their fractions of it. With train and test, validation is carved from train
    with validation / (train + validation) of it (0.15 / 0.85 by default), so the proportion
    between train and validation is kept; likewise test from train+validation.

    Options (None means the default):
      TFDS datasets: image_key / label_key (the Image and ClassLabel features; default 'image'
                     else the only Image feature, 'label' else the only ClassLabel),
                     tfds_splits=(train, validation, test) TFDS split strings, e.g.
                     ('train[:80%]', 'train[80%:]', 'test'); validation or test may be None
                     (carved from train), download (default True: fetch when `data_dir`
                     lacks the dataset)
      image_folder:  path (required): one subfolder per class, images jpg/jpeg/png/bmp/gif;
                     unreadable files are skipped with a warning (Dataset.skipped)
      digits:        classes (digits to keep, relabelled 0..k-1 in the order given)
    and for all: train_per_class (keep only that many training examples per class: few-shot;
    validation and test keep their full shares).
    Relative `data_dir` and `path` are taken from the current directory; gs:// stays as is.
    Raises DataError for anything the user can fix.
    """
    options = {key: value for key, value in options.items() if value is not None}
    fractions = _check_fractions(splits)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}.")
    train_per_class = options.pop("train_per_class", None)
    if train_per_class is not None and not (isinstance(train_per_class, int)
                                            and train_per_class >= 1):
        raise DataError("train_per_class must be a positive integer or None, "
                        f"got {train_per_class!r}.")
    loader = _LOADERS[name] if name in _LOADERS else functools.partial(_load_tfds, name)
    allowed = set(inspect.signature(loader).parameters) - {"image_size", "data_dir"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DataError(f"Unknown option(s) {unknown} for dataset {name!r}; "
                        f"valid options: {sorted(allowed | {'train_per_class'})}.")
    if "path" in options:
        options["path"] = _absolute(options["path"])
    loaded = loader(image_size=image_size, data_dir=_absolute(data_dir), **options)
    dataset = _assemble(loaded, name, fractions, seed, train_per_class)
    _log_found(loaded, dataset, options.get("path") or name, fractions, seed, train_per_class)
    return dataset


def load_from_config(config) -> Dataset:
    """The dataset a search config describes: config.model.input_size and config.data's name,
    data_dir, path (image_folder), image_key / label_key / tfds_splits (TFDS), classes
    (digits), splits, split_seed and train_per_class."""
    d = config.data
    get = lambda key: d.get(key) if hasattr(d, "get") else getattr(d, key, None)
    options = {"train_per_class": get("train_per_class")}
    for key in _APPLIES_TO:
        if get(key) is not None and key not in unused_keys(d):
            options[key] = tuple(get(key)) if key in ("classes", "tfds_splits") else get(key)
    if unused_keys(d):
        log.warning("%s: not used by data.name=%r; ignored.", ", ".join(
            f"data.{key}" for key in unused_keys(d)), d.name)
    return load_dataset(d.name, image_size=config.model.input_size, data_dir=get("data_dir"),
                        splits=tuple(d.splits), seed=d.split_seed, **options)


# The data keys that only some datasets use.
_APPLIES_TO = {"path": "image_folder", "classes": "digits", "image_key": "tfds",
               "label_key": "tfds", "tfds_splits": "tfds"}


def unused_keys(data_config) -> list[str]:
    """The keys of config.data that are set but that its data.name does not use."""
    kind = data_config.name if data_config.name in LOCAL_DATASETS else "tfds"
    get = lambda key: (data_config.get(key) if hasattr(data_config, "get")
                       else getattr(data_config, key, None))
    return [key for key, used_by in _APPLIES_TO.items()
            if get(key) is not None and used_by != kind]


def _absolute(path: str | None) -> str | None:
    """A user's path, absolute (relative to the current directory); URLs (gs://) unchanged."""
    if path is None or "://" in str(path):
        return path
    return str(Path(path).expanduser().absolute())


def _check_fractions(splits) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(f) for f in splits)
    except TypeError:
        fractions = ()
    if len(fractions) != 3 or not all(f > 0 for f in fractions) \
            or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise DataError("splits must be three positive fractions (train, validation, test) "
                        f"summing to 1, got {splits!r}.")
    return fractions


def _assemble(loaded: _Loaded, name: str, fractions, seed: int, train_per_class) -> Dataset:
    """Carves what the source lacks from its train split (see load_dataset) into a Dataset."""
    images, labels = loaded.parts["train"]
    has = {part for part in ("validation", "test") if part in loaded.parts}
    f_train, f_val, f_test = fractions
    if has == {"validation", "test"}:
        carve = (0.0, 0.0)
    elif has == {"test"}:
        carve = (f_val / (f_train + f_val), 0.0)
    elif has == {"validation"}:
        carve = (0.0, f_test / (f_train + f_test))
    else:
        carve = (f_val, f_test)
    chosen = _carve(labels, carve, seed, train_per_class, loaded.class_names)
    take = lambda idx: (Split(images, labels) if len(idx) == len(labels)  # no copy
                        else Split(images[idx], labels[idx]))
    split = {part: Split(*loaded.parts[part]) if part in has else take(idx)
             for part, idx in zip(PARTS, chosen)}
    for part, s in split.items():
        if not len(s):
            raise DataError(f"The {part} split of {name!r} is empty ({len(labels)} examples "
                            f"to carve from, fractions {tuple(fractions)}); raise its fraction "
                            "in data.splits or use a larger dataset.")
    return Dataset(split["train"], split["validation"], split["test"], list(loaded.class_names),
                   name, list(loaded.skipped))


def _log_found(loaded: _Loaded, dataset: Dataset, source: str, fractions, seed: int,
               train_per_class) -> None:
    """What a Keras user reads first: how many images in which classes, and the splits."""
    found = sum(len(labels) for _, labels in loaded.parts.values())
    names = dataset.class_names
    shown = ", ".join(names) if len(names) <= 12 else f"{', '.join(names[:10])}, ... {names[-1]}"
    skipped = f"; {len(loaded.skipped)} unreadable file(s) skipped" if loaded.skipped else ""
    log.info("Found %s images in %d classes (%s) in %s%s", f"{found:,}", len(names), shown,
             source, skipped)
    own = [part for part in ("validation", "test") if part in loaded.parts]
    carved = [part for part in ("validation", "test") if part not in own]
    how = []
    if own:
        how.append(f"{' and '.join(own)}: the dataset's own")
    if carved:
        how.append(f"{' and '.join(carved)} carved from train, stratified by class "
                   f"(data.splits {'/'.join(f'{f:g}' for f in fractions)}, "
                   f"data.split_seed {seed})")
    if train_per_class is not None:
        how.append(f"train keeps {train_per_class} per class")
    log.info("Splits: train %s, validation %s, test %s images; %s", f"{len(dataset.train):,}",
             f"{len(dataset.validation):,}", f"{len(dataset.test):,}", "; ".join(how))


def _carve(labels, fractions, seed, train_per_class, class_names):
    """Index arrays (train, validation, test), each sorted; deterministic given `seed`.
    `fractions` are validation's and test's shares of each class (0: none)."""
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = (int(f * len(idx) + 0.5) for f in fractions)
        train, val, test = np.split(idx, [len(idx) - n_val - n_test, len(idx) - n_test])
        if train_per_class is not None:
            if train_per_class > len(train):
                raise DataError(f"train_per_class={train_per_class} but class "
                                f"{class_names[c]!r} has only {len(train)} training examples.")
            train = train[:train_per_class]
        for part, chosen in zip(parts, (train, val, test)):
            part.append(chosen)
    return tuple(np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts)


# ------------------------------------------------------------------------------------ images

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})  # Keras's image loader's
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class UnreadableImageError(OSError):
    """A file that is not a readable image; the message is the reason, in a few words."""


def read_image(path, image_size: int) -> np.ndarray:
    """One image file as the models see it: (image_size, image_size, 3) uint8 RGB, the way
    every dataset here is resized (`to_rgb`). Raises UnreadableImageError with the reason."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    try:
        if path.is_dir():
            raise UnreadableImageError("a directory, not an image file")
        if not path.exists():
            reason = "broken symbolic link" if path.is_symlink() else "no such file"
            raise UnreadableImageError(reason)
        if path.stat().st_size == 0:
            raise UnreadableImageError("empty file (0 bytes)")
        with Image.open(path) as image:
            image.load()  # decodes now: a truncated file fails here, not later
            return to_rgb(image, image_size)
    except UnreadableImageError:
        raise
    except UnidentifiedImageError:
        raise UnreadableImageError("not an image PIL can decode") from None
    except PermissionError:
        raise UnreadableImageError("permission denied") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error,
            Image.DecompressionBombError) as e:
        raise UnreadableImageError(f"cannot be decoded ({e})") from None


def to_rgb(image, image_size: int) -> np.ndarray:
    """A PIL image or an HxW / HxWxC (C = 1, 3, 4) uint8 or uint16 array -> (image_size,
    image_size, 3) uint8 RGB: greyscale replicated, alpha dropped, 16-bit scaled to 8 bits,
    palettes and CMYK converted; bilinear (PIL) resize, aspect ratio ignored. The one resize
    of training data (TFDS and image folders) and of `predict`."""
    from PIL import Image
    if isinstance(image, np.ndarray):
        array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        if array.dtype == np.uint16:
            array = _to_8bit(array)
        if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3
                                                               and array.shape[-1] in (3, 4))):
            raise DataError(f"Images must be HxW or HxWx(1, 3, 4) uint8/uint16 arrays, got "
                            f"shape {image.shape} dtype {image.dtype}.")
        image = Image.fromarray(array)
    if image.mode in _16BIT_MODES:  # PIL's own conversion would clip at 255 (white)
        image = Image.fromarray(_to_8bit(np.asarray(image)))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return _resize(np.asarray(image), image_size)


def _to_8bit(array: np.ndarray) -> np.ndarray:
    return np.round(np.clip(array, 0, 65535) / 257.0).astype(np.uint8)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of one HxWxC (or HxW) uint8 image to size x size, aspect ratio ignored."""
    from PIL import Image
    pil = Image.fromarray(image)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BILINEAR)
    return np.asarray(pil)


def _decode_examples(examples: Iterable[dict], image_key: str, label_key: str,
                     image_size: int, total: int | None, what: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of TFDS examples, images through to_rgb in threads (PIL releases the
    GIL) into one array, logging progress: a large dataset takes minutes."""
    progress = _Progress(what, total)
    images = np.empty((total or 0, image_size, image_size, 3), np.uint8)
    labels, done = [], 0
    convert = functools.partial(to_rgb, image_size=image_size)
    with concurrent.futures.ThreadPoolExecutor() as pool:
        for chunk in _chunks(examples, 64):
            if done + len(chunk) > len(images):  # more than announced (or unknown): grow
                extra = np.empty((max(len(images), 256),) + images.shape[1:], np.uint8)
                images = np.concatenate([images[:done], extra])
            images[done:done + len(chunk)] = list(pool.map(convert, (ex[image_key]
                                                                     for ex in chunk)))
            labels += [ex[label_key] for ex in chunk]
            done += len(chunk)
            progress.update(done)
    progress.finish(done)
    if done < len(images):  # fewer than announced: free the rest
        images = images[:done].copy()
    return images, np.asarray(labels, np.int32)


def _chunks(iterable: Iterable, size: int) -> Iterator[list]:
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class _Progress:
    """Logs 'what: done/total images (pct), rate' every 10% or every 30 seconds, once the work
    has taken `quiet_seconds` (a small folder decodes in a blink: the line saying what was
    found is enough), and one line when it ends."""

    def __init__(self, what: str, total: int | None, every_seconds: float = 30.0,
                 quiet_seconds: float = 2.0):
        self.what, self.total, self.every, self.quiet = what, total, every_seconds, quiet_seconds
        self.start = self.last_time = time.perf_counter()
        self.last_tenth, self.logged = 0, None

    def update(self, done: int) -> None:
        now = time.perf_counter()
        tenth = done * 10 // self.total if self.total else 0
        if now - self.start < self.quiet:
            return
        if tenth > self.last_tenth or now - self.last_time >= self.every:
            self.last_tenth, self.last_time = tenth, now
            self._log(done, now)

    def finish(self, done: int) -> None:
        if self.logged != done:
            self._log(done, time.perf_counter())

    def _log(self, done: int, now: float) -> None:
        self.logged = done
        rate = done / max(now - self.start, 1e-9)
        of = f"/{self.total:,} ({100 * done // self.total}%)" if self.total else ""
        log.info("%s: %s%s images decoded and resized, %.0f images/s", self.what,
                 f"{done:,}", of, rate)


# TFDS ---------------------------------------------------------------------------------------

def _load_tfds(name: str, *, image_size, data_dir, image_key: str | None = None,
               label_key: str | None = None, tfds_splits=None, download: bool = True
               ) -> _Loaded:
    requested = _check_tfds_splits(tfds_splits)
    tf, tfds = _import_tfds()
    data_dir = (data_dir or os.environ.get("TFDS_DATA_DIR")
                or os.path.expanduser("~/tensorflow_datasets"))
    builder = _tfds_builder(tfds, name, data_dir)
    image_key, label_key = _feature_keys(tfds, builder, name, image_key, label_key)
    class_names = [str(n) for n in builder.info.features[label_key].names]

    cache = _cache_path(builder, data_dir, image_size, image_key, label_key, requested)
    cached = _read_cache(tf, cache)
    if cached is not None:
        log.info("%s: decoded images from %s", name, cache)
        return cached

    _ensure_prepared(builder, name, data_dir, download)
    parts = _tfds_parts(builder, name, requested)
    counts = [_num_examples(builder, split) for split in parts.values()]
    if None not in counts:  # unknown only when TFDS is mocked without metadata
        _check_memory(sum(counts), image_size, name, "or read part of the dataset with "
                      "data.tfds_splits (e.g. ('train[:20%]', None, None))")
    decoded = {}
    for part, split in parts.items():
        examples = builder.as_dataset(split=split, shuffle_files=False, decoders=(
            tfds.decode.PartialDecoding({image_key: True, label_key: True})))
        # TFDS's order is fixed (shuffle_files=False), and so is the carving.
        decoded[part] = _decode_examples(tfds.as_numpy(examples), image_key, label_key,
                                         image_size, _num_examples(builder, split),
                                         f"{name} {split}")
    loaded = _Loaded(decoded, class_names)
    if _tfds_on_disk(builder, parts.values()):  # mocked TFDS (tests): never cache fake images
        _write_cache(tf, cache, loaded)
    return loaded


def _import_tfds():
    import tensorflow as tf
    import tensorflow_datasets as tfds
    try:  # TF is the input pipeline only: keep it off the accelerators JAX uses.
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices (then it is too late to matter)
        pass
    return tf, tfds


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def check_tfds_name(name: str) -> str:
    """The TFDS builder's name for `name` (e.g. 'cats_vs_dogs' for 'cats_vs_dogs:4.*.*'),
    checked without TensorFlow, data or network; DataError with the closest names TFDS has when
    it has no such dataset. Namespaced (community) names are left to TFDS itself."""
    import difflib

    from tensorflow_datasets.core import naming
    from tensorflow_datasets.core.registered import DatasetNotFoundError
    import tensorflow_datasets as tfds
    try:
        parsed, _ = naming.parse_builder_name_kwargs(name)
    except Exception as e:  # TFDS's own parser: a malformed name
        raise DataError(f"data.name={name!r} is not a dataset name TFDS can read "
                        f"({_one_line(e, 120)}).") from None
    if parsed.namespace:
        return parsed.name
    try:
        tfds.builder_cls(parsed.name)
        return parsed.name
    except DatasetNotFoundError:
        pass
    close = difflib.get_close_matches(parsed.name, tfds.list_builders(
        with_community_datasets=False), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise DataError(f"Unknown dataset {name!r}: TFDS has no such dataset.{hint} Any TFDS "
                    "image-classification dataset works (e.g. tf_flowers, beans, cats_vs_dogs), "
                    "or image_folder (data.path: one subfolder per class) or digits.")


@contextlib.contextmanager
def _temporary_files_removed():
    """Python's temporary files and directories go to one of ours, removed after. A TFDS
    builder fetches its dataset's metadata through a `tempfile.mkdtemp("tfds")` that it never
    removes (dataset_info.initialize_from_bucket; empty when the bucket is out of reach): one
    more /tmp/tmp*tfds directory every time a search loads a dataset."""
    ours = tempfile.mkdtemp(prefix="blockft_jax_tfds_")
    previous, tempfile.tempdir = tempfile.tempdir, ours
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(ours, ignore_errors=True)


def _tfds_builder(tfds, name: str, data_dir: str):
    from tensorflow_datasets.core.registered import DatasetNotFoundError
    ours = ("Any TFDS image-classification dataset works (e.g. tf_flowers, beans, "
            "cats_vs_dogs), or one of ours: image_folder (data.path: one subfolder per "
            "class), digits (offline demo).")
    try:
        with _temporary_files_removed():
            return tfds.builder(name, data_dir=data_dir)
    except DatasetNotFoundError as e:
        guess = re.search(r"Did you mean: \S+ -> (\S+?) ?\?", str(e))
        hint = f" (did you mean {guess.group(1)!r}?)" if guess else ""
        raise DataError(f"Unknown dataset {name!r}: TFDS does not know it{hint}. {ours}") \
            from None
    except (ValueError, AssertionError) as e:  # e.g. an unknown version or config
        raise DataError(f"TFDS cannot build dataset {name!r}: {_one_line(e)}") from None


def _feature_keys(tfds, builder, name, image_key, label_key) -> tuple[str, str]:
    """The top-level Image and ClassLabel features to use (see load_dataset)."""
    features = builder.info.features
    chosen = []
    for key, kind, cls, default, option in (
            (image_key, "Image", tfds.features.Image, "image", "image_key"),
            (label_key, "ClassLabel", tfds.features.ClassLabel, "label", "label_key")):
        candidates = [k for k, f in features.items() if isinstance(f, cls)]
        if key is not None:
            if key not in candidates:
                raise DataError(f"{option}={key!r} is not one of {name!r}'s {kind} features "
                                f"({', '.join(candidates) or 'it has none'}).")
        elif default in candidates:
            key = default
        elif len(candidates) == 1:
            key = candidates[0]
        elif not candidates:
            raise DataError(f"{name!r} has no top-level {kind} feature (features: "
                            f"{list(features)}); it is not an image-classification dataset.")
        else:
            raise DataError(f"{name!r} has several {kind} features {candidates}; choose one "
                            f"with data.{option}.")
        chosen.append(key)
    channels = features[chosen[0]].shape[-1]
    if channels not in (None, 1, 3, 4):
        raise DataError(f"{name!r}'s {chosen[0]!r} images have {channels} channels; only "
                        "greyscale, RGB and RGBA images can be used.")
    return chosen[0], chosen[1]


def _check_tfds_splits(tfds_splits) -> dict[str, str] | None:
    """{part: TFDS split string} for the parts a user named, or None (the dataset's own)."""
    if tfds_splits is None:
        return None
    splits = tuple(tfds_splits) if isinstance(tfds_splits, (tuple, list)) else ()
    if (len(splits) != 3 or not isinstance(splits[0], str)
            or not all(s is None or isinstance(s, str) for s in splits[1:])):
        raise DataError("tfds_splits must be three TFDS split strings (train, validation, test),"
                        " validation or test may be None (carved from train), e.g. "
                        f"('train[:80%]', 'train[80%:]', 'test'); got {tfds_splits!r}.")
    return {part: s for part, s in zip(PARTS, splits) if s is not None}


def _cache_path(builder, data_dir, image_size, image_key, label_key, requested) -> str:
    """One file per dataset, version, size, feature choice and split choice."""
    key = builder.info.full_name.replace("/", "-") + f"-{image_size}px"
    if (image_key, label_key) != ("image", "label"):
        key += f"-{image_key}-{label_key}"
    if requested is not None:
        key += "-" + ",".join(f"{p}={s}" for p, s in requested.items())
    key = re.sub(r"[^\w.,=+-]", lambda m: f"%{ord(m.group()):02X}", key)  # a safe file name
    return os.path.join(data_dir, "blockft_jax_cache", key + ".npz")


def _read_cache(tf, path: str) -> _Loaded | None:
    if not tf.io.gfile.exists(path):
        return None
    if "://" in path:
        with tf.io.gfile.GFile(path, "rb") as f:
            saved = np.load(io.BytesIO(f.read()))
    else:
        saved = np.load(path)
    with saved:
        class_names = [str(n) for n in saved["class_names"]]
        if "images" in saved.files:  # caches written before splits were kept: TFDS's train
            return _Loaded({"train": (saved["images"], saved["labels"])}, class_names)
        parts = {p: (saved[f"{p}_images"], saved[f"{p}_labels"]) for p in PARTS
                 if f"{p}_images" in saved.files}
    return _Loaded(parts, class_names)


def _write_cache(tf, path: str, loaded: _Loaded) -> None:
    """Atomic (temporary file + rename): a killed run never leaves a truncated cache."""
    arrays = {"class_names": np.asarray(loaded.class_names)}
    for part, (images, labels) in loaded.parts.items():
        arrays[f"{part}_images"], arrays[f"{part}_labels"] = images, labels
    tmp = path + f".tmp{uuid.uuid4().hex}"  # pids repeat across hosts sharing data_dir
    tf.io.gfile.makedirs(os.path.dirname(path))
    if "://" in path:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with tf.io.gfile.GFile(tmp, "wb") as f:
            f.write(buffer.getvalue())
    else:
        with open(tmp, "wb") as f:  # straight to disk: no second copy in memory
            np.savez(f, **arrays)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _ensure_prepared(builder, name: str, data_dir: str, download: bool) -> None:
    """Downloads and prepares the dataset when data_dir lacks it, with one clear error when
    that cannot be done."""
    try:
        builder.as_dataset(split=None, shuffle_files=False)  # lazy; passes when TFDS is mocked
        return
    except AssertionError as e:  # TFDS's "could not find data in <data_dir>"
        missing = e
    try:
        if not download:
            raise missing
        _check_reachable(builder)
        log.info("Downloading and preparing %s into %s", name, data_dir)
        builder.download_and_prepare()
    except Exception as e:
        raise DataError(
            f"{name} is not available in {data_dir!r} and could not be downloaded "
            f"({type(e).__name__}: {_one_line(e)}). Either download it on a machine with "
            f"network (tfds.builder({name!r}).download_and_prepare()) and copy its TFDS "
            f"directory {builder.name}/ into that data_dir, or use the 'image_folder' or "
            "'digits' datasets.") from e


def _check_reachable(builder) -> None:
    """TFDS retries a failed download for minutes; one request to the dataset's first URL
    tells in seconds. An HTTP error status still means the network is there."""
    urls = sorted(builder.url_infos or ())
    if not urls or not urls[0].startswith("http"):
        return
    try:
        urllib.request.urlopen(urllib.request.Request(urls[0], method="HEAD"), timeout=20)
    except urllib.error.HTTPError:
        pass


def _tfds_parts(builder, name: str, requested: dict[str, str] | None) -> dict[str, str]:
    """{part: TFDS split} to read: those requested, or the dataset's own train, validation
    and test (mocked TFDS without metadata knows no split names: then train alone)."""
    available = list(builder.info.splits)
    if requested is not None:
        if available:
            for split in requested.values():
                try:
                    builder.info.splits[split]
                except (KeyError, ValueError, AssertionError) as e:
                    raise DataError(f"tfds_splits: {split!r} is not a split of {name!r} "
                                    f"({_one_line(e, 120)}); it has {available}.") from None
        return requested
    if available and "train" not in available:
        raise DataError(f"{name!r} has no 'train' split (it has {available}); name the splits "
                        "to use with data.tfds_splits=(train, validation, test), e.g. "
                        f"('{available[0]}[:70%]', '{available[0]}[70%:85%]', "
                        f"'{available[0]}[85%:]').")
    return {part: part for part in PARTS if part == "train" or part in available}


def _num_examples(builder, split: str) -> int | None:
    try:
        return int(builder.info.splits[split].num_examples)
    except (KeyError, ValueError, AssertionError):  # split names unknown (mocked TFDS)
        return None


def available_memory() -> int | None:
    """Bytes of memory available to this process now (None when the system does not say)."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:  # Linux: counts reclaimable page cache too
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(images: int, image_size: int, what: str, read_less: str) -> None:
    """Refuses before decoding when the arrays cannot fit: they are held twice for a moment
    (while the splits are carved, or the decoded images stacked)."""
    need = 2 * images * image_size * image_size * 3
    available = available_memory()
    if available is not None and need > available:
        raise DataError(
            f"{what} at {image_size} px needs about {need / 2**30:.1f} GiB of memory "
            f"({images:,} images x {image_size}x{image_size}x3 bytes, twice while splitting) "
            f"but {available / 2**30:.1f} GiB is available; lower model.input_size, "
            f"{read_less}.")


def _tfds_on_disk(builder, splits) -> bool:
    """Whether the data files of `splits` really exist (mocked TFDS has metadata at most)."""
    try:
        paths = [p for split in splits for p in builder.info.splits[split].filepaths]
    except (KeyError, ValueError, AssertionError):
        return False
    return bool(paths) and all(p.exists() for p in paths)


# image_folder -------------------------------------------------------------------------------

def image_folder_classes(path) -> list[tuple[Path, list[Path]]]:
    """(class folder, its image files by suffix) for each class of an image folder: one
    subfolder per class (sorted names: Keras's order; hidden ones ignored), images found
    recursively. Nothing is decoded. Raises DataError when the layout is wrong; a class
    without image files is listed with none (the loader says which classes lack images)."""
    root = Path(path)
    if not root.is_dir():
        what = "it is a file" if root.exists() else "it does not exist"
        raise DataError(f"data.path={str(root)!r} is not a directory ({what}"
                        f"{_closest_folder(root)}); point it at a directory with one subfolder "
                        "per class (e.g. photos/cats/1.jpg, photos/dogs/2.jpg).")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                        key=lambda d: d.name)
    if not class_dirs:
        raise DataError(f"No class subfolders in {str(root)!r}: put each class's images in a "
                        "subfolder named after the class (e.g. cats/1.jpg, dogs/2.jpg).")
    if len(class_dirs) == 1:
        raise DataError(f"{str(root)!r} has only one class subfolder ({class_dirs[0].name!r}); "
                        "a classifier needs two or more: one subfolder per class.")
    return [(d, sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
            for d in class_dirs]


def _closest_folder(path: Path) -> str:
    """'; did you mean .../photos?' when a folder beside `path` has a similar name."""
    import difflib
    try:
        siblings = [p.name for p in path.parent.iterdir() if p.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
    return f"; did you mean {str(path.parent / close[0])!r}?" if close else ""


def _load_image_folder(*, image_size, data_dir, path: str | None = None) -> _Loaded:
    """An image folder (see image_folder_classes), decoded. Files that are not readable images
    are skipped with one warning."""
    del data_dir  # the folder is `path`
    if path is None:
        raise DataError("image_folder needs data.path: a directory with one subfolder per "
                        "class.")
    root = Path(path)
    class_dirs, files, labels = [], [], []
    for label, (class_dir, found) in enumerate(image_folder_classes(root)):
        class_dirs.append(class_dir)
        files += found
        labels += [label] * len(found)

    def read(file):
        try:
            return read_image(file, image_size), None
        except UnreadableImageError as e:
            return None, str(e)

    _check_memory(len(files), image_size, str(root), "or use fewer images")
    progress, results = _Progress(str(root), len(files)), []
    with concurrent.futures.ThreadPoolExecutor() as pool:  # PIL releases the GIL when decoding
        for result in pool.map(read, files):
            results.append(result)
            progress.update(len(results))
    progress.finish(len(results))
    labels = np.asarray(labels, np.int32)
    keep = [i for i, (image, _) in enumerate(results) if image is not None]
    skipped = [(str(file), reason) for file, (_, reason) in zip(files, results) if reason]
    if skipped:
        per_class = collections.Counter(class_dirs[label].name for label, (_, reason)
                                        in zip(labels, results) if reason)
        _warn_skipped(root, skipped, per_class, len(files))
    counts = np.bincount(labels[keep], minlength=len(class_dirs))
    empty = [str(class_dirs[c]) for c in np.flatnonzero(counts == 0)]
    if len(empty) == len(class_dirs):
        raise DataError(f"No readable image in {str(root)!r}: none of its class subfolders has "
                        f"a {'/'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))} file that can be "
                        "decoded; add images, or point data.path at the right folder.")
    if empty:
        raise DataError(f"Class folder(s) {', '.join(empty)} have no readable image; add images "
                        "to them or remove them.")
    images = np.stack([results[i][0] for i in keep])
    return _Loaded({"train": (images, labels[keep])}, [d.name for d in class_dirs], skipped)


def _warn_skipped(root: Path, skipped, per_class: dict, total: int, listed: int = 50) -> None:
    """One warning naming the skipped files (the first `listed`), with counts per class."""
    lines = [f"  {os.path.relpath(path, root)}: {reason}" for path, reason in skipped[:listed]]
    if len(skipped) > listed:
        lines.append(f"  ... and {len(skipped) - listed} more (Dataset.skipped lists all)")
    log.warning("Skipped %d of %d files in %s that are not readable images (%s); the others "
                "are used:\n%s", len(skipped), total, root,
                ", ".join(f"{name}: {count}" for name, count in per_class.items()),
                "\n".join(lines))


# digits -------------------------------------------------------------------------------------

def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 handwritten digits: (images (N, 8, 8) of values 0..16, labels).
    Read from the file scikit-learn ships (what its `load_digits` parses) without importing
    scikit-learn, which takes over a second a process; `load_digits` where the file moved."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data",
                        "digits.csv.gz") if spec and spec.submodule_search_locations else ""
    if os.path.exists(path):
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits
    digits = load_digits()
    return digits.images, digits.target


def _load_digits(*, image_size, data_dir, classes=tuple(range(10))) -> _Loaded:
    """scikit-learn's 1,797 8x8 handwritten digits (bundled, no download): offline demo data."""
    del data_dir
    classes = tuple(classes)
    if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(range(10)):
        raise DataError(f"classes must be distinct digits 0..9, got {classes!r}.")
    all_images, all_labels = digits_arrays()
    keep = np.isin(all_labels, classes)
    grey = np.round(all_images[keep] * (255 / 16)).astype(np.uint8)  # values 0..16
    images = np.stack([_resize(g, image_size) for g in grey])
    images = np.repeat(images[..., None], 3, axis=-1)
    relabel = np.zeros(10, np.int32)
    relabel[list(classes)] = np.arange(len(classes))
    return _Loaded({"train": (images, relabel[all_labels[keep]])}, [str(c) for c in classes])


_LOADERS = {"image_folder": _load_image_folder, "digits": _load_digits}


# ----------------------------------------------------------------------- on-device transforms

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess(images, mode: str) -> jnp.ndarray:
    """Keras's `preprocess_input` for a model's mode: 'caffe' (VGG16: RGB->BGR, ImageNet mean
    subtracted), 'tf' (scaled to [-1, 1]) or 'raw' (MobileNetV3s rescale inside the model)."""
    x = jnp.asarray(images).astype(jnp.float32)
    if mode == "caffe":
        return x[..., ::-1] - jnp.asarray(_CAFFE_MEAN_BGR, jnp.float32)
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "raw":
        return x
    raise ValueError(f"Unknown preprocessing mode {mode!r}; expected 'caffe', 'tf' or 'raw'.")


@functools.partial(jax.jit, static_argnames=("flip", "crop"))
def augment(rng: jax.Array, images, *, flip: bool, crop: bool) -> jnp.ndarray:
    """Per-image random horizontal flip and random resized crop (area 50-100% of the image,
    aspect ratio 3/4-4/3, resized back bilinearly to the same size). float32 out, same range."""
    x = jnp.asarray(images).astype(jnp.float32)
    n, h, w = x.shape[:3]
    k_crop, k_flip = jax.random.split(rng)
    if crop:
        u = jax.random.uniform(k_crop, (4, n))
        area = (0.5 + 0.5 * u[0]) * h * w
        ratio = jnp.exp(math.log(3 / 4) + u[1] * (math.log(4 / 3) - math.log(3 / 4)))
        crop_h = jnp.minimum(jnp.sqrt(area / ratio), h)
        crop_w = jnp.minimum(jnp.sqrt(area * ratio), w)
        top, left = u[2] * (h - crop_h), u[3] * (w - crop_w)
        # scale_and_translate maps input coordinate v to v * scale + translation: the crop
        # window [top, top + crop_h) lands exactly on the output's [0, h). Shapes stay static.
        scale = jnp.stack([h / crop_h, w / crop_w], axis=-1)
        translation = -jnp.stack([top, left], axis=-1) * scale
        resize = lambda image, s, t: jax.image.scale_and_translate(
            image, image.shape, (0, 1), s, t, method="linear", antialias=False)
        x = jax.vmap(resize)(x, scale, translation)
    if flip:
        x = jnp.where(jax.random.bernoulli(k_flip, shape=(n, 1, 1, 1)), x[:, :, ::-1], x)
    return x


# ----------------------------------------------------------------------------------- batching

def batch_order(n: int, batch_size: int, *, shuffle_rng: np.random.Generator | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The example indices of ceil(n / batch_size) full-size batches, and their mask, both
    (batches, batch_size): every example exactly once, shuffled when `shuffle_rng` is given.
    The last batch is padded with repeats of real examples (mask 0), so the step never sees a
    new shape. On several hosts, every process must draw the same permutation (same seed)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    order = shuffle_rng.permutation(n) if shuffle_rng is not None else np.arange(n)
    steps = -(-n // batch_size)
    mask = (np.arange(steps * batch_size) < n).astype(np.float32).reshape(steps, batch_size)
    indices = np.concatenate([np.resize(order[start:start + batch_size], batch_size)
                              for start in range(0, n, batch_size)] or [np.zeros(0, np.int64)])
    return indices.reshape(steps, batch_size).astype(np.int32), mask


def batches(split: Split, batch_size: int, *, shuffle_rng: np.random.Generator | None
            ) -> Iterator[Batch]:
    """The batches of `batch_order` (see there), as host arrays."""
    indices, mask = batch_order(len(split.labels), batch_size, shuffle_rng=shuffle_rng)
    for idx, m in zip(indices, mask):
        yield Batch(split.images[idx], split.labels[idx].astype(np.int32), m)
