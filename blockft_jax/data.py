"""Datasets in memory, Keras preprocessing, augmentation and batch sharding.

    ds = load_dataset("tf_flowers", image_size=224)          # decoded and resized once, cached
    for batch in batches(ds.train, 64, shuffle_rng=np.random.default_rng(0)):
        batch = global_batch(process_slice(batch), mesh)      # sharded along the mesh's 'data' axis
        x = preprocess(augment(rng, batch.images, flip=True, crop=True), "tf")   # on device, jitted

Datasets are small (tf_flowers: 3,670 images), so each split is one uint8 array in host memory:
decoding and resizing happen once, never per epoch, and batches are plain numpy gathers.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import inspect
import io
import math
import os
import pathlib
import urllib.request
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass
class Batch:
    images: np.ndarray | jax.Array  # (batch_size, H, W, 3) uint8, always full size
    labels: np.ndarray | jax.Array  # (batch_size,) int32
    mask: np.ndarray | jax.Array    # (batch_size,) float32: 1 real example, 0 padding


# ----------------------------------------------------------------------------------- loading

def load_dataset(name: str, *, image_size: int, data_dir: str | None = None,
                 splits=(0.7, 0.15, 0.15), seed: int = 0, **options) -> Dataset:
    """Loads `name`, resized to image_size x image_size, carved into train/validation/test.

    The carving is stratified by class and seeded: for each class, validation and test take
    round(fraction x class size) examples, train the rest. Options by dataset:
      tf_flowers:   download (default True: fetch with TFDS when `data_dir` lacks it)
      image_folder: path (required): one subfolder per class, images jpg/jpeg/png/bmp/gif
      digits:       classes (digits to keep, relabelled 0..k-1 in the order given)
    and for all: train_per_class (keep only that many training examples per class: few-shot;
    validation and test keep their full shares).
    """
    if name not in _LOADERS:
        raise ValueError(f"Unknown dataset {name!r}. "
                         f"Available datasets: {', '.join(DATASET_NAMES)}.")
    fractions = _check_fractions(splits)
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
    train_per_class = options.pop("train_per_class", None)
    if train_per_class is not None and not (isinstance(train_per_class, int)
                                            and train_per_class >= 1):
        raise ValueError("train_per_class must be a positive integer or None, "
                         f"got {train_per_class!r}.")
    loader = _LOADERS[name]
    allowed = set(inspect.signature(loader).parameters) - {"image_size", "data_dir"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for dataset {name!r}; "
                         f"valid options: {sorted(allowed | {'train_per_class'})}.")

    images, labels, class_names = loader(image_size=image_size, data_dir=data_dir, **options)
    parts = _carve(labels, fractions, seed, train_per_class, class_names)
    train, validation, test = (Split(images[i], labels[i]) for i in parts)
    return Dataset(train, validation, test, list(class_names), name)


def _check_fractions(splits) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(f) for f in splits)
    except TypeError:
        fractions = ()
    if len(fractions) != 3 or not all(f > 0 for f in fractions) \
            or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError("splits must be three positive fractions (train, validation, test) "
                         f"summing to 1, got {splits!r}.")
    return fractions


def _carve(labels, fractions, seed, train_per_class, class_names):
    """Index arrays (train, validation, test), each sorted; deterministic given `seed`."""
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val, n_test = (int(f * len(idx) + 0.5) for f in fractions[1:])
        train, val, test = np.split(idx, [len(idx) - n_val - n_test, len(idx) - n_test])
        if train_per_class is not None:
            if train_per_class > len(train):
                raise ValueError(f"train_per_class={train_per_class} but class "
                                 f"{class_names[c]!r} has only {len(train)} training examples.")
            train = train[:train_per_class]
        for part, chosen in zip(parts, (train, val, test)):
            part.append(chosen)
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of one HxWxC (or HxW) uint8 image to size x size, aspect ratio ignored."""
    from PIL import Image
    pil = Image.fromarray(image)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.BILINEAR)
    return np.asarray(pil)


# tf_flowers ---------------------------------------------------------------------------------

# TFDS retries a failed download for about 3.5 minutes; one request tells in seconds.
_TF_FLOWERS_URL = "http://download.tensorflow.org/example_images/flower_photos.tgz"


def _load_tf_flowers(*, image_size, data_dir, download: bool = True):
    import tensorflow as tf
    import tensorflow_datasets as tfds
    try:  # TF is the input pipeline only: keep it off the accelerators JAX uses.
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices (then it is too late to matter)
        pass

    data_dir = (data_dir or os.environ.get("TFDS_DATA_DIR")
                or os.path.expanduser("~/tensorflow_datasets"))
    builder = tfds.builder("tf_flowers", data_dir=data_dir)
    cache = os.path.join(data_dir, "blockft_jax_cache",
                         f"tf_flowers-{builder.info.version}-{image_size}px.npz")
    if tf.io.gfile.exists(cache):
        with tf.io.gfile.GFile(cache, "rb") as f:
            saved = np.load(io.BytesIO(f.read()))
            return saved["images"], saved["labels"], [str(n) for n in saved["class_names"]]

    try:
        try:  # already prepared in data_dir (or TFDS mocked by tests)?
            examples = builder.as_dataset(split="train", shuffle_files=False)
        except AssertionError:  # TFDS's "could not find data in <data_dir>"
            if not download:
                raise
            urllib.request.urlopen(urllib.request.Request(_TF_FLOWERS_URL, method="HEAD"),
                                   timeout=20)
            builder.download_and_prepare()
            examples = builder.as_dataset(split="train", shuffle_files=False)
    except Exception as e:
        raise RuntimeError(
            f"tf_flowers is not available in {data_dir!r} and could not be downloaded "
            f"({type(e).__name__}: {e}). Either download it on a machine with network "
            "(tfds.builder('tf_flowers').download_and_prepare()) and copy its TFDS directory "
            "tf_flowers/ into that data_dir, or use the 'image_folder' or 'digits' datasets."
        ) from e
    images, labels = [], []
    # TFDS's order is fixed (shuffle_files=False), and so is the carving.
    for ex in tfds.as_numpy(examples):
        images.append(_resize(ex["image"], image_size))
        labels.append(ex["label"])
    images, labels = np.stack(images), np.asarray(labels, np.int32)
    class_names = builder.info.features["label"].names
    if not builder.is_prepared():  # mocked TFDS (tests): never let fake images into the cache
        return images, labels, class_names

    # Atomic write (temp file + rename): a killed run never leaves a truncated cache.
    tf.io.gfile.makedirs(os.path.dirname(cache))
    buffer = io.BytesIO()
    np.savez(buffer, images=images, labels=labels, class_names=np.asarray(class_names))
    with tf.io.gfile.GFile(cache + f".tmp{os.getpid()}", "wb") as f:
        f.write(buffer.getvalue())
    tf.io.gfile.rename(cache + f".tmp{os.getpid()}", cache, overwrite=True)
    return images, labels, class_names


# image_folder -------------------------------------------------------------------------------

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}  # those Keras's image loader reads


def _load_image_folder(*, image_size, data_dir, path: str | None = None):
    del data_dir  # the folder is `path`
    if path is None:
        raise ValueError("image_folder needs path=<directory with one subfolder per class>.")
    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"image_folder path {str(root)!r} is not a directory.")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir())  # Keras's order
    files, labels = [], []
    for label, class_name in enumerate(class_names):
        found = sorted(p for p in (root / class_name).rglob("*")
                       if p.suffix.lower() in _IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise ValueError(f"No images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in class subfolders "
                         f"of {str(root)!r}.")

    def read(file):
        from PIL import Image
        with Image.open(file) as image:
            return _resize(np.asarray(image.convert("RGB")), image_size)

    with concurrent.futures.ThreadPoolExecutor() as pool:  # PIL releases the GIL when decoding
        images = np.stack(list(pool.map(read, files)))
    return images, np.asarray(labels, np.int32), class_names


# digits -------------------------------------------------------------------------------------

def _load_digits(*, image_size, data_dir, classes=tuple(range(10))):
    """scikit-learn's 1,797 8x8 handwritten digits (bundled, no download): offline demo data."""
    del data_dir
    from sklearn.datasets import load_digits
    classes = tuple(classes)
    if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(range(10)):
        raise ValueError(f"classes must be distinct digits 0..9, got {classes!r}.")
    digits = load_digits()
    keep = np.isin(digits.target, classes)
    grey = np.round(digits.images[keep] * (255 / 16)).astype(np.uint8)  # values 0..16
    images = np.stack([_resize(g, image_size) for g in grey])
    images = np.repeat(images[..., None], 3, axis=-1)
    relabel = np.zeros(10, np.int32)
    relabel[list(classes)] = np.arange(len(classes))
    return images, relabel[digits.target[keep]], [str(c) for c in classes]


_LOADERS = {"tf_flowers": _load_tf_flowers, "image_folder": _load_image_folder,
            "digits": _load_digits}
DATASET_NAMES = tuple(_LOADERS)


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
    """The batches of `batch_order` (see there), as host arrays; on several hosts, feed
    `process_slice` of each batch."""
    indices, mask = batch_order(len(split.labels), batch_size, shuffle_rng=shuffle_rng)
    for idx, m in zip(indices, mask):
        yield Batch(split.images[idx], split.labels[idx].astype(np.int32), m)


def process_slice(batch: Batch) -> Batch:
    """This process's contiguous share of a global-size host batch (identity on one process)."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return batch
    size = len(batch.labels)
    if size % count:
        raise ValueError(f"Global batch size {size} is not divisible by the {count} processes.")
    rows = slice(index * size // count, (index + 1) * size // count)
    return Batch(batch.images[rows], batch.labels[rows], batch.mask[rows])


def global_batch(batch: Batch, mesh: Mesh) -> Batch:
    """A batch of global jax.Arrays sharded along the mesh axis 'data' (replicated over any
    other axis), built from this process's local rows, so the same code runs on one host or
    a pod."""
    if "data" not in mesh.axis_names:
        raise ValueError(f"The mesh needs a 'data' axis, it has {mesh.axis_names}.")
    axis = mesh.axis_names.index("data")
    local_shards = len({pos[axis] for pos, device in np.ndenumerate(mesh.devices)
                        if device.process_index == jax.process_index()})
    size = len(batch.labels)
    if size % local_shards:
        raise ValueError(f"Per-process batch size {size} is not divisible by the {local_shards} "
                         "local devices along the mesh's 'data' axis; choose a batch size that is "
                         f"a multiple of {local_shards * jax.process_count()}.")
    sharding = NamedSharding(mesh, P("data"))
    put = lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return Batch(put(batch.images), put(batch.labels), put(batch.mask))
