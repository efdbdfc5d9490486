"""Data: loading (TFDS, image folders, digits) and carving, Keras preprocessing parity,
augmentation, batching, sharding."""
import io
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from unittest import mock

import jax
import numpy as np
import pytest
from PIL import Image

from blockft_jax.inputs import data
from blockft_jax.inputs.data import DataError


def _assert_carving(ds, n_total):
    sizes = [len(ds.train), len(ds.validation), len(ds.test)]
    assert sum(sizes) == n_total and min(sizes) > 0
    for split in (ds.train, ds.validation, ds.test):
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        assert split.images.shape[0] == split.labels.shape[0]


def _expected_share(labels, fraction):
    """Per-class counts the stratified carving gives `fraction` of."""
    return [int(fraction * n + 0.5) for n in np.bincount(labels) if n]


# -------------------------------------------------------------------------------------- TFDS

tfds = pytest.importorskip("tensorflow_datasets")

# Real split layouts (sizes from the TFDS catalogue): mocked TFDS knows split names only from
# a dataset_info.json in its data_dir.
LAYOUTS = {"cats_vs_dogs": {"train": 23262},
           "rock_paper_scissors": {"train": 2520, "test": 372},
           "beans": {"train": 1034, "validation": 133, "test": 128}}


@pytest.fixture(autouse=True)
def python_tmp(tmp_path_factory, monkeypatch):
    """TFDS builders the tests make themselves leave a temporary directory each (the package's
    own are removed: test_loading_a_tfds_dataset_leaves_no_temporary_directory); here they go
    to pytest's temporary directories, not /tmp."""
    temporary = tmp_path_factory.mktemp("python_tmp")
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    return temporary


def _tfds_metadata(data_dir, name, splits):
    builder = tfds.builder(name, data_dir=str(data_dir))
    builder.info.set_splits(tfds.core.SplitDict(
        [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in splits.items()]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
    return str(data_dir)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_tfds_split_layouts(tmp_path, name):
    """Own validation/test splits are used; what is missing is carved from train."""
    tfds_dir = _tfds_metadata(tmp_path, name, LAYOUTS[name])
    n = 30  # mocked TFDS gives every split the same n examples
    with tfds.testing.mock_data(num_examples=n, data_dir=tfds_dir):
        ds = data.load_dataset(name, image_size=16, data_dir=tfds_dir, seed=2)
        whole = data.load_dataset(name, image_size=16, data_dir=tfds_dir,
                                  tfds_splits=("train", "train", "train"))  # nothing carved
    assert ds.class_names == tfds.builder(name).info.features["label"].names
    assert ds.train.images.shape[1:] == (16, 16, 3)
    source = whole.train.labels  # TFDS's train split, uncarved, in TFDS's order
    assert len(source) == n
    layout = set(LAYOUTS[name])
    if layout == {"train"}:  # validation and test: 15% of each class each
        _assert_carving(ds, n)
        assert np.bincount(ds.validation.labels).tolist() == _expected_share(source, 0.15)
    elif layout == {"train", "test"}:  # validation: 0.15 / 0.85 of train, test is TFDS's
        assert len(ds.test) == n and len(ds.train) + len(ds.validation) == n
        assert np.bincount(ds.validation.labels).tolist() == _expected_share(source, 0.15 / 0.85)
    else:  # all three are TFDS's own, nothing carved
        for part in ("train", "validation", "test"):
            np.testing.assert_array_equal(getattr(ds, part).labels, source)
        np.testing.assert_array_equal(ds.train.images, whole.train.images)


def test_tfds_explicit_splits(tmp_path):
    tfds_dir = _tfds_metadata(tmp_path, "beans", LAYOUTS["beans"])
    read = []
    with tfds.testing.mock_data(num_examples=30, data_dir=tfds_dir):
        mocked = tfds.core.DatasetBuilder.as_dataset

        def recording(self, *args, split=None, **kwargs):
            read.append(split)
            return mocked(self, *args, split=split, **kwargs)

        with mock.patch.object(tfds.core.DatasetBuilder, "as_dataset", recording):
            ds = data.load_dataset("beans", image_size=8, data_dir=tfds_dir,
                                   tfds_splits=("train[:80%]", "train[80%:]", "test"))
            assert read[1:] == ["train[:80%]", "train[80%:]", "test"]
            assert [len(ds.train), len(ds.validation), len(ds.test)] == [30, 30, 30]
            read.clear()
            carved = data.load_dataset("beans", image_size=8, data_dir=tfds_dir,
                                       tfds_splits=("train", None, "test"))
            assert read[1:] == ["train", "test"]  # validation carved from train
            assert len(carved.train) + len(carved.validation) == 30 and len(carved.test) == 30
        with pytest.raises(DataError, match="'bogus' is not a split of 'beans'.*validation"):
            data.load_dataset("beans", image_size=8, data_dir=tfds_dir,
                              tfds_splits=("train", "bogus", "test"))
    for bad in (("train", "test"), "train", ("train", 3, None), (None, "validation", "test")):
        with pytest.raises(DataError, match="tfds_splits must be three"):
            data.load_dataset("beans", image_size=8, data_dir=tfds_dir, tfds_splits=bad)


def test_tfds_cache_never_holds_mocked_data(tmp_path, monkeypatch, caplog):
    with tfds.testing.mock_data(num_examples=60), caplog.at_level(logging.INFO):
        # No metadata: the split names are unknown, so train only, as tf_flowers has.
        mocked = data.load_dataset("tf_flowers", image_size=16, data_dir=str(tmp_path / "m"))
        assert not (tmp_path / "m").exists()  # fake images never reach a cache
        assert "tf_flowers train: 60 images decoded and resized" in caplog.text
        # Caching happens when the data files are really there; pretend they are.
        monkeypatch.setattr(data, "_tfds_on_disk", lambda builder, splits: True)
        first = data.load_dataset("tf_flowers", image_size=16, data_dir=str(tmp_path / "a"))
        fresh = data.load_dataset("tf_flowers", image_size=16, data_dir=str(tmp_path / "b"))
        data.load_dataset("tf_flowers", image_size=16, data_dir=str(tmp_path / "a"),
                          tfds_splits=("train[:50%]", None, None))
    np.testing.assert_array_equal(mocked.train.images, first.train.images)
    assert first.class_names == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
    assert first.train.images.shape[1:] == (16, 16, 3)
    _assert_carving(first, 60)
    cache = tmp_path / "a" / "blockft_jax_cache"
    assert sorted(p.name for p in cache.iterdir()) == [
        "tf_flowers-3.0.1-16px-train=train%5B%3A50%25%5D.npz", "tf_flowers-3.0.1-16px.npz"]

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
    # A cache from before splits were kept (TFDS's train split alone) still reads.
    old = np.load(cache / "tf_flowers-3.0.1-16px.npz")
    np.savez(cache / "tf_flowers-3.0.1-16px.npz", images=old["train_images"],
             labels=old["train_labels"], class_names=old["class_names"])
    legacy = data.load_dataset("tf_flowers", image_size=16, data_dir=str(tmp_path / "a"))
    np.testing.assert_array_equal(legacy.test.images, first.test.images)


def test_loading_a_tfds_dataset_leaves_no_temporary_directory(tmp_path, python_tmp):
    """TFDS's builder makes a temporary directory for the metadata it fetches and never removes
    it; a search removes it (each load used to leave an empty /tmp/tmp*tfds)."""
    with tfds.testing.mock_data(num_examples=20):
        data.load_dataset("tf_flowers", image_size=8, data_dir=str(tmp_path / "tfds"))
    assert tempfile.tempdir == str(python_tmp)
    assert not [p.name for p in python_tmp.iterdir() if "tfds" in p.name]


def test_tfds_feature_keys_and_greyscale(tmp_path):
    # smallnorb: two greyscale Image features, five ClassLabels and none called 'label'.
    tfds_dir = str(tmp_path)
    with tfds.testing.mock_data(num_examples=20):
        with pytest.raises(DataError, match="several ClassLabel features .*data.label_key"):
            data.load_dataset("smallnorb", image_size=8, data_dir=tfds_dir)
        ds = data.load_dataset("smallnorb", image_size=8, data_dir=tfds_dir,
                               label_key="label_category")
        second = data.load_dataset("smallnorb", image_size=8, data_dir=tfds_dir,
                                   image_key="image2", label_key="label_lighting")
        with pytest.raises(DataError, match="image_key='label_category' is not one of"):
            data.load_dataset("smallnorb", image_size=8, data_dir=tfds_dir,
                              image_key="label_category", label_key="label_category")
        with pytest.raises(DataError, match="no top-level ClassLabel.*not an image-class"):
            data.load_dataset("lfw", image_size=8, data_dir=tfds_dir)  # its label is text
    assert ds.class_names == ["four-legged animals", "human figures", "airplanes", "trucks",
                              "cars"]
    assert second.num_classes == 6
    images = ds.train.images
    assert images.shape[1:] == (8, 8, 3) and images.std() > 0
    assert np.array_equal(images[..., 0], images[..., 1]) and np.array_equal(
        images[..., 0], images[..., 2])  # greyscale became RGB


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="did you mean 'beans'.*Any TFDS image-classification"
                                        ".*image_folder.*digits"):
        data.load_dataset("beanz", image_size=8)


def test_tfds_offline_error_is_short_and_says_what_to_do(tmp_path, monkeypatch):
    empty = str(tmp_path / "empty")
    with pytest.raises(DataError, match="image_folder") as info:
        data.load_dataset("beans", image_size=8, data_dir=empty, download=False)
    assert empty in str(info.value) and "\n" not in str(info.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="beans is not available .*could not be downloaded"
                                        ".*Name or service") as info:
        data.load_dataset("beans", image_size=8, data_dir=empty)
    assert empty in str(info.value) and "digits" in str(info.value)


def test_tfds_refuses_what_memory_cannot_hold(tmp_path, monkeypatch):
    assert data.available_memory() > 0
    tfds_dir = _tfds_metadata(tmp_path, "cats_vs_dogs", LAYOUTS["cats_vs_dogs"])
    monkeypatch.setattr(data, "available_memory", lambda: 2**30)
    with tfds.testing.mock_data(num_examples=20, data_dir=tfds_dir):
        # 2 x 23,262 x 224 x 224 x 3 bytes = 6.5 GiB > 1 GiB: refused before decoding.
        with pytest.raises(DataError, match=r"needs about 6\.5 GiB.*23,262 images.*1\.0 GiB "
                                            r"is available.*model\.input_size.*tfds_splits"):
            data.load_dataset("cats_vs_dogs", image_size=224, data_dir=tfds_dir)
        assert len(data.load_dataset("cats_vs_dogs", image_size=32, data_dir=tfds_dir).train)


def test_search_end_to_end_on_a_tfds_dataset(tmp_path):
    from blockft_jax.search import search
    from configs import tiny
    config = tiny.get_config()
    config.data.name = "beans"
    config.data.data_dir = _tfds_metadata(tmp_path / "tfds", "beans", LAYOUTS["beans"])
    config.model.input_size = 32
    config.train.epochs = 1
    config.search.strategies = ("classifier_only", "layerwise")
    config.search.max_layers = 1
    with tfds.testing.mock_data(num_examples=40, data_dir=config.data.data_dir):
        summary = search.run(config, tmp_path / "work")
    assert set(summary["strategies"]) == {"classifier_only", "layerwise"}
    meta = json.loads((tmp_path / "work" / "models" / "layerwise" / "model.json").read_text())
    assert meta["dataset"] == "beans"
    assert meta["class_names"] == ["angular_leaf_spot", "bean_rust", "healthy"]


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
    (root / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    Image.new("RGB", (4, 4)).save(root / ".ipynb_checkpoints" / "x.png")
    return colours


def test_image_folder(tmp_path):
    colours = _write_folder(tmp_path / "imgs")
    ds = data.load_dataset("image_folder", image_size=8, path=str(tmp_path / "imgs"), seed=3)
    assert ds.class_names == ["ant", "cat", "dog"]  # sorted, as Keras orders them
    assert ds.skipped == []
    _assert_carving(ds, 33)
    # 11 images per class: validation and test get round(0.15 * 11) = 2 each, train the rest.
    for split, n in ((ds.train, 7), (ds.validation, 2), (ds.test, 2)):
        assert np.bincount(split.labels).tolist() == [n] * 3
        assert split.images.shape == (3 * n, 8, 8, 3)
    for image, label in zip(ds.train.images, ds.train.labels):
        pixel = tuple(image[4, 4])
        assert pixel in (colours[ds.class_names[label]], (128, 128, 128))


def _save(image, path, **kwargs):
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "P", "I;16", "1", "LA", "upper-case"])
def test_read_image_modes(tmp_path, mode):
    """Every mode becomes 8-bit RGB with the right colour (the folder loader, TFDS and
    predict share this)."""
    red = (200, 30, 40)
    if mode == "RGBA":
        path, expected = _save(Image.new("RGBA", (6, 5), red + (0,)), tmp_path / "a.png"), red
    elif mode == "CMYK":  # JPEG, lossy
        path, expected = _save(Image.new("RGB", (6, 5), red).convert("CMYK"),
                               tmp_path / "a.jpg", quality=100), red
    elif mode == "P":
        palette = Image.new("P", (6, 5), 1)
        palette.putpalette([0, 0, 0, *red])
        path, expected = _save(palette, tmp_path / "a.gif"), red
    elif mode == "I;16":  # 16-bit PNG: scaled down, not clipped to white
        path = _save(Image.fromarray(np.full((5, 6), 128 * 257, np.uint16)), tmp_path / "a.png")
        expected = (128, 128, 128)
    elif mode == "1":
        path, expected = _save(Image.new("1", (6, 5), 1), tmp_path / "a.bmp"), (255, 255, 255)
    elif mode == "LA":
        path, expected = _save(Image.new("LA", (6, 5), (90, 0)), tmp_path / "a.png"), (90,) * 3
    else:
        path, expected = _save(Image.new("RGB", (6, 5), red), tmp_path / "a.JPEG", quality=100), red
    if mode != "upper-case":
        assert Image.open(path).mode == mode
    image = data.read_image(path, 4)
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image.reshape(-1, 3), [expected] * 16, atol=3)


def test_to_rgb_arrays():
    grey16 = np.arange(16, dtype=np.uint16).reshape(4, 4, 1) * 4000
    out = data.to_rgb(grey16, 3)
    assert out.shape == (3, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(data.to_rgb(grey16, 4)[..., 1],
                                  np.round(grey16[..., 0] / 257))  # no resize at the same size
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 9
    np.testing.assert_array_equal(data.to_rgb(rgba, 2), np.tile([9, 0, 0], (2, 2, 1)))
    with pytest.raises(DataError, match="HxWx"):
        data.to_rgb(np.zeros((2, 2, 5), np.uint8), 2)


def test_image_folder_skips_unreadable_files_with_one_warning(tmp_path, caplog):
    root = tmp_path / "imgs"
    _write_folder(root, n_per_class=4)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(noise).save(jpeg, "JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) * 2 // 3])
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "dog" / "text.jpg").write_text("not an image")
    (root / "dog" / "folder.jpg").mkdir()
    (root / "ant" / "link.png").symlink_to(tmp_path / "deleted.png")
    expected = {"cat/truncated.jpg": "cannot be decoded (image file is truncated",
                "cat/empty.png": "empty file (0 bytes)",
                "dog/text.jpg": "not an image PIL can decode",
                "dog/folder.jpg": "a directory, not an image file",
                "ant/link.png": "broken symbolic link"}
    if os.geteuid() != 0:  # root reads anything
        locked = _save(Image.new("RGB", (4, 4)), root / "ant" / "locked.png")
        locked.chmod(0)
        expected["ant/locked.png"] = "permission denied"
    with caplog.at_level(logging.WARNING, logger="blockft_jax.inputs.data"):
        ds = data.load_dataset("image_folder", image_size=8, path=str(root))
    assert len(ds.train) + len(ds.validation) + len(ds.test) == 3 * 5  # the readable ones
    reasons = {os.path.relpath(path, root): reason for path, reason in ds.skipped}
    assert set(reasons) == set(expected)
    for name, reason in expected.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    warnings = [r for r in caplog.records if r.name == "blockft_jax.inputs.data"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert f"Skipped {len(expected)} of {3 * 5 + len(expected)} files" in message
    assert f"ant: {len(expected) - 4}" in message and "cat: 2" in message and "dog: 2" in message
    assert all(name in message for name in expected)


def test_image_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data.path"):
        data.load_dataset("image_folder", image_size=8)
    with pytest.raises(DataError, match="not a directory"):
        data.load_dataset("image_folder", image_size=8, path=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="No class subfolders"):
        data.load_dataset("image_folder", image_size=8, path=str(tmp_path))
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="only one class subfolder \\('a'\\)"):
        data.load_dataset("image_folder", image_size=8, path=str(tmp_path))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="^No readable image in .*add images"):
        data.load_dataset("image_folder", image_size=8, path=str(tmp_path))
    for i in range(8):
        _save(Image.new("RGB", (4, 4)), tmp_path / "a" / f"{i}.png")
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match=f"Class folder\\(s\\) {tmp_path / 'b'}, {tmp_path / 'c'} "
                                        "have no readable image; add images to them or remove"):
        data.load_dataset("image_folder", image_size=8, path=str(tmp_path))
    monkeypatch.setattr(data, "available_memory", lambda: 1000)
    with pytest.raises(DataError, match="9 images x 8x8x3 bytes.*lower model.input_size, or "
                                        "use fewer images"):
        data.load_dataset("image_folder", image_size=8, path=str(tmp_path))


def test_load_from_config_relative_paths(tmp_path, monkeypatch, caplog):
    from configs import tiny
    _write_folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    config = tiny.get_config()  # data.classes=(5, 6, 7): for digits only
    config.data.name = "image_folder"
    config.data.path = "imgs"  # relative, as users type it
    config.data.train_per_class = 5
    config.model.input_size = 8
    with caplog.at_level(logging.WARNING, logger="blockft_jax.inputs.data"):
        ds = data.load_from_config(config)
    assert "data.classes: not used by data.name='image_folder'" in caplog.text
    direct = data.load_dataset("image_folder", image_size=8, path=str(tmp_path / "imgs"),
                               splits=config.data.splits, train_per_class=5)
    assert np.bincount(ds.train.labels).tolist() == [5, 5, 5]
    for part in ("train", "validation", "test"):
        np.testing.assert_array_equal(getattr(ds, part).images, getattr(direct, part).images)
    assert data._absolute("x") == str(tmp_path / "x")
    assert data._absolute("gs://bucket/tfds") == "gs://bucket/tfds"
    assert data._absolute("~/x") == os.path.expanduser("~/x")


def test_load_from_config_tfds_options(tmp_path):
    from configs import tiny
    config = tiny.get_config()
    config.data.name = "smallnorb"
    config.data.label_key = "label_category"
    config.data.tfds_splits = ("train", None, "test")
    config.data.data_dir = str(tmp_path)
    config.data.train_per_class = 2
    config.model.input_size = 8
    with tfds.testing.mock_data(num_examples=30):
        ds = data.load_from_config(config)
    assert ds.num_classes == 5 and len(ds.test) == 30
    assert set(np.bincount(ds.train.labels)) == {2}


# ----------------------------------------------------------------------------------- digits

def test_digits_are_scikit_learns():
    """Read from scikit-learn's file without importing it: what its own loader returns."""
    from sklearn.datasets import load_digits
    reference = load_digits()
    images, labels = data.digits_arrays()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)


def test_digits_classes_and_few_shot():
    _, target = data.digits_arrays()
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
    with pytest.raises(DataError, match="only"):
        data.load_dataset("digits", image_size=8, train_per_class=1000)
    with pytest.raises(DataError, match="distinct digits"):
        data.load_dataset("digits", image_size=8, classes=(1, 1))


def test_bad_options_fractions_and_empty_splits():
    with pytest.raises(DataError, match="Unknown option"):
        data.load_dataset("digits", image_size=8, colour=True)
    with pytest.raises(DataError, match=r"\['path'\] for dataset 'digits'; valid options: "
                                        r"\['classes', 'train_per_class'\]"):
        data.load_dataset("digits", image_size=8, path="x")
    for splits in [(0.5, 0.5), (0.7, 0.2, 0.2), (1.0, 0.0, 0.0), (1.2, -0.1, -0.1), 0.7]:
        with pytest.raises(DataError, match="splits"):
            data.load_dataset("digits", image_size=8, splits=splits)
    with pytest.raises(DataError, match="image_size"):
        data.load_dataset("digits", image_size=0)
    with pytest.raises(DataError, match="The validation split of 'digits' is empty"):
        data.load_dataset("digits", image_size=8, splits=(0.998, 0.001, 0.001))


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


def test_the_tfds_cache_is_written_under_a_name_of_its_own(tmp_path):
    """Hosts sharing a gs:// data_dir repeat process ids: each cache write goes through a
    temporary name of its own, so two writers never share one."""
    import tensorflow as tf
    loaded = data._Loaded({"train": (np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64))},
                          ["a"])
    renamed = []
    real = tf.io.gfile.rename
    with mock.patch.object(tf.io.gfile, "rename",
                           lambda src, dst, overwrite: renamed.append(src) or real(src, dst,
                                                                                 overwrite)):
        for _ in range(2):
            data._write_cache(tf, str(tmp_path / "cache.npz"), loaded)
    assert len(set(renamed)) == 2, renamed
    assert [p.name for p in tmp_path.iterdir()] == ["cache.npz"]
    assert data._read_cache(tf, str(tmp_path / "cache.npz")).class_names == ["a"]
