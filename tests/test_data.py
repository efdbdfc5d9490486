"""Data: loading and carving, Keras preprocessing parity, augmentation, batching, sharding."""
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

from blockft_jax import data


def _assert_carving(ds, n_total):
    sizes = [len(ds.train), len(ds.validation), len(ds.test)]
    assert sum(sizes) == n_total and min(sizes) > 0
    for split in (ds.train, ds.validation, ds.test):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        assert split.images.shape[0] == split.labels.shape[0]


# ------------------------------------------------------------------------------- tf_flowers

def test_tf_flowers_mocked_shapes_determinism_and_cache(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=60):
        mocked = data.load_dataset("tf_flowers", image_size=16, data_dir=str(tmp_path / "m"))
        assert not (tmp_path / "m").exists()  # fake images never reach a cache
        # Caching happens when the data is really there (prepared); pretend it is.
        monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
        first = data.load_dataset("tf_flowers", image_size=16, data_dir=str(tmp_path / "a"))
        fresh = data.load_dataset("tf_flowers", image_size=16, data_dir=str(tmp_path / "b"))
    np.testing.assert_array_equal(mocked.train.images, first.train.images)
    assert first.class_names == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
    assert first.train.images.shape[1:] == (16, 16, 3)
    _assert_carving(first, 60)
    cache = tmp_path / "a" / "blockft_jax_cache"
    assert [p.name for p in cache.iterdir()] == ["tf_flowers-3.0.1-16px.npz"]

    # The second load reads the cache: decoding is not even possible now.
    def no_decoding(*args, **kwargs):
        raise AssertionError("TFDS was read although the cache exists")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_dataset", no_decoding)
    again = data.load_dataset("tf_flowers", image_size=16, data_dir=str(tmp_path / "a"))
    for ds in (again, fresh):  # from cache, and decoded from scratch elsewhere
        for name in ("train", "validation", "test"):
            np.testing.assert_array_equal(getattr(ds, name).images, getattr(first, name).images)
            np.testing.assert_array_equal(getattr(ds, name).labels, getattr(first, name).labels)
    # Another seed reuses the same cache and carves differently.
    other = data.load_dataset("tf_flowers", image_size=16, data_dir=str(tmp_path / "a"), seed=1)
    assert not np.array_equal(other.test.images, first.test.images)


def test_tf_flowers_offline_error_is_short_and_says_what_to_do(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    empty = str(tmp_path / "empty")
    with pytest.raises(RuntimeError, match="image_folder") as info:
        data.load_dataset("tf_flowers", image_size=8, data_dir=empty, download=False)
    assert empty in str(info.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="could not be downloaded.*Name or service") as info:
        data.load_dataset("tf_flowers", image_size=8, data_dir=empty)
    assert empty in str(info.value) and "digits" in str(info.value)


# ----------------------------------------------------------------------------- image_folder

def _write_folder(root, n_per_class=10):
    colours = {"cat": (255, 0, 0), "dog": (0, 255, 0), "ant": (0, 0, 255)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            suffix = "png" if i % 2 else "PNG"
            Image.new("RGB", (10 + i, 12), colour).save(root / name / f"{i}.{suffix}")
        Image.new("L", (9, 9), 128).save(root / name / "grey.png")  # greyscale -> 3 channels
        (root / name / "notes.txt").write_text("not an image")
    return colours


def test_image_folder(tmp_path):
    colours = _write_folder(tmp_path / "imgs")
    ds = data.load_dataset("image_folder", image_size=8, path=str(tmp_path / "imgs"), seed=3)
    assert ds.class_names == ["ant", "cat", "dog"]  # sorted, as Keras orders them
    _assert_carving(ds, 33)
    # 11 images per class: validation and test get round(0.15 * 11) = 2 each, train the rest.
    for split, n in ((ds.train, 7), (ds.validation, 2), (ds.test, 2)):
        assert np.bincount(split.labels).tolist() == [n] * 3
        assert split.images.shape == (3 * n, 8, 8, 3)
    for image, label in zip(ds.train.images, ds.train.labels):
        pixel = tuple(image[4, 4])
        assert pixel in (colours[ds.class_names[label]], (128, 128, 128))


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="path="):
        data.load_dataset("image_folder", image_size=8)
    with pytest.raises(ValueError, match="not a directory"):
        data.load_dataset("image_folder", image_size=8, path=str(tmp_path / "missing"))
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="No images"):
        data.load_dataset("image_folder", image_size=8, path=str(tmp_path))


# ----------------------------------------------------------------------------------- digits

def test_digits_classes_and_few_shot():
    from sklearn.datasets import load_digits
    target = load_digits().target
    full = data.load_dataset("digits", image_size=32, classes=(3, 1, 7))
    few = data.load_dataset("digits", image_size=32, classes=(3, 1, 7), train_per_class=5)
    assert full.class_names == few.class_names == ["3", "1", "7"]
    assert full.num_classes == 3
    assert few.train.images.shape == (15, 32, 32, 3)
    assert np.bincount(few.train.labels).tolist() == [5, 5, 5]
    for split in ("validation", "test"):  # few-shot trims train only
        np.testing.assert_array_equal(getattr(few, split).labels, getattr(full, split).labels)
        expected = [int(0.15 * np.sum(target == d) + 0.5) for d in (3, 1, 7)]
        assert np.bincount(getattr(full, split).labels).tolist() == expected
    _assert_carving(full, int(np.isin(target, (3, 1, 7)).sum()))
    images = full.train.images
    assert np.array_equal(images[..., 0], images[..., 2]) and images.max() == 255
    with pytest.raises(ValueError, match="only"):
        data.load_dataset("digits", image_size=8, train_per_class=1000)
    with pytest.raises(ValueError, match="distinct digits"):
        data.load_dataset("digits", image_size=8, classes=(1, 1))


def test_bad_names_options_and_fractions():
    with pytest.raises(ValueError, match="tf_flowers, image_folder, digits"):
        data.load_dataset("mnist", image_size=8)
    with pytest.raises(ValueError, match="Unknown option"):
        data.load_dataset("digits", image_size=8, colour=True)
    for splits in [(0.5, 0.5), (0.7, 0.2, 0.2), (1.0, 0.0, 0.0), (1.2, -0.1, -0.1), 0.7]:
        with pytest.raises(ValueError, match="splits"):
            data.load_dataset("digits", image_size=8, splits=splits)
    with pytest.raises(ValueError, match="image_size"):
        data.load_dataset("digits", image_size=0)


# ---------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("mode, keras_module", [
    ("caffe", "vgg16"), ("tf", "mobilenet_v2"), ("raw", "mobilenet_v3")])
def test_preprocess_matches_keras(mode, keras_module):
    import importlib
    keras_module = importlib.import_module(f"keras.applications.{keras_module}")
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    expected = np.asarray(keras_module.preprocess_input(images.astype(np.float32)))
    for out in (data.preprocess(images, mode),
                jax.jit(data.preprocess, static_argnames="mode")(images, mode=mode)):
        assert out.dtype == np.float32
        np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="preprocessing mode"):
        data.preprocess(images, "torch")


def test_model_preprocessing_modes_are_known():
    from blockft_jax import models
    for name in models.MODEL_NAMES:
        data.preprocess(np.zeros((1, 2, 2, 3), np.uint8), models.model_class(name).preprocessing)


# ------------------------------------------------------------------------------ augmentation

def test_augment_shapes_determinism_and_range():
    images = np.random.default_rng(0).integers(0, 256, (6, 12, 12, 3), dtype=np.uint8)
    key = jax.random.key(0)
    out = data.augment(key, images, flip=True, crop=True)
    assert out.shape == images.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, data.augment(key, images, flip=True, crop=True))
    assert not np.array_equal(out, data.augment(jax.random.key(1), images, flip=True, crop=True))
    assert 0 <= out.min() and out.max() <= 255
    np.testing.assert_array_equal(data.augment(key, images, flip=False, crop=False), images)


def test_augment_flip_only_flips_and_crop_keeps_a_constant_image():
    images = np.random.default_rng(1).integers(0, 256, (16, 4, 5, 3), dtype=np.uint8)
    out = np.asarray(data.augment(jax.random.key(2), images, flip=True, crop=False))
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    constant = np.full((4, 9, 9, 3), 77, np.uint8)
    np.testing.assert_allclose(
        data.augment(jax.random.key(3), constant, flip=False, crop=True), constant, atol=1e-4)


def test_crop_zooms_in():
    ramp = np.broadcast_to(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (2, 32, 32, 3))
    out = np.asarray(data.augment(jax.random.key(4), ramp, flip=False, crop=True))
    for row in out[:, 16, :, 0]:  # still increasing, but a narrower span: a crop, stretched
        assert np.all(np.diff(row) >= -1e-3) and row[-1] - row[0] < 248


# ----------------------------------------------------------------------------------- batches

def _split(n):
    return data.Split(np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3),
                                                                               np.uint8),
                      np.arange(n, dtype=np.int32))


@pytest.mark.parametrize("n, batch_size", [(10, 4), (8, 4), (3, 5), (0, 4)])
def test_batches_cover_every_example_once(n, batch_size):
    for rng in (None, np.random.default_rng(0)):
        out = list(data.batches(_split(n), batch_size, shuffle_rng=rng))
        assert len(out) == -(-n // batch_size)
        seen = []
        for b in out:
            assert b.images.shape == (batch_size, 2, 2, 3) and b.labels.dtype == np.int32
            assert b.mask.dtype == np.float32
            np.testing.assert_array_equal(b.images[:, 0, 0, 0], b.labels)  # pairs kept together
            seen += b.labels[b.mask == 1].tolist()
        assert sorted(seen) == list(range(n))
        if rng is None:
            assert seen == list(range(n))
    if n == 10:
        assert out[-1].mask.tolist() == [1, 1, 0, 0]


def test_batches_shuffle_is_seeded():
    def order(seed):
        return [b.labels.tolist() for b in
                data.batches(_split(10), 4, shuffle_rng=np.random.default_rng(seed))]
    assert order(0) == order(0) != order(1)
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(_split(10), 0, shuffle_rng=None))


# ---------------------------------------------------------------------------------- sharding

def test_global_batch_single_device_and_process_slice(monkeypatch):
    batch = next(data.batches(_split(8), 8, shuffle_rng=None))
    assert data.process_slice(batch) is batch
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    out = data.global_batch(batch, mesh)
    assert isinstance(out.images, jax.Array)
    assert out.images.sharding.spec == jax.sharding.PartitionSpec("data")
    for name in ("images", "labels", "mask"):
        np.testing.assert_array_equal(getattr(out, name), getattr(batch, name))
    with pytest.raises(ValueError, match="'data' axis"):
        data.global_batch(batch, jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",)))

    # Two processes: each feeds its half, and the halves make the whole.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    halves = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        halves.append(data.process_slice(batch))
    np.testing.assert_array_equal(np.concatenate([h.labels for h in halves]), batch.labels)


def test_global_batch_shards_over_two_devices():
    # The device count is fixed when JAX starts, so two CPU devices need a fresh process.
    code = textwrap.dedent("""
        import jax, numpy as np
        from blockft_jax import data
        mesh = jax.make_mesh((2,), ("data",))
        split = data.Split(np.zeros((6, 2, 2, 3), np.uint8), np.arange(6, dtype=np.int32))
        batch = next(data.batches(split, 4, shuffle_rng=None))
        out = data.global_batch(batch, mesh)
        assert [s.data.shape[0] for s in out.labels.addressable_shards] == [2, 2]
        assert out.labels.tolist() == [0, 1, 2, 3]
        try:
            data.global_batch(next(data.batches(split, 3, shuffle_rng=None)), mesh)
        except ValueError as e:
            assert "not divisible by the 2 local devices" in str(e), e
        else:
            raise AssertionError("no error for an odd batch")
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
