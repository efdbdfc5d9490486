"""Weight conversion: strictness, clear errors, saving, and the ImageNet download path."""
import concurrent.futures
import email.message
import io
import time
import urllib.error
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest

from blockft_jax import models
from blockft_jax.inputs import weights
from keras_oracle import reference

V2 = ("mobilenet_v2", 0.35, 33, ())


def v2_module(**kw):
    return models.create("mobilenet_v2", width=0.35, **kw)


def test_wrong_models_file_is_refused():
    ref = reference("mobilenet_v1", 0.25, 35, ())
    for path in (ref.legacy_h5, ref.keras3_h5):
        with pytest.raises(weights.WeightsError, match="Conv1|shape mismatch|another model"):
            weights.load_keras(path, v2_module(), (33, 33, 3))


def test_width_mismatch_names_layer_and_shapes():
    ref = reference("mobilenet_v2", 1.3, 32, ())
    with pytest.raises(weights.WeightsError) as err:
        weights.load_keras(ref.legacy_h5, v2_module(), (32, 32, 3))
    message = str(err.value)
    assert "shape mismatch in layer 'Conv1'" in message
    assert "(3, 3, 3, 40)" in message and "(3, 3, 3, 16)" in message
    assert str(ref.legacy_h5) in message


def test_truncated_file_is_refused(tmp_path):
    ref = reference(*V2)
    for path in (ref.legacy_h5, ref.keras3_h5):
        data = path.read_bytes()
        cut = tmp_path / path.name
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(weights.WeightsError, match="truncated"):
            weights.load_keras(cut, v2_module(), (33, 33, 3))


def test_missing_file():
    with pytest.raises(weights.WeightsError, match="nowhere.h5"):
        weights.load_keras("/nowhere.h5", v2_module(), (33, 33, 3))


def test_head_is_fresh_and_everything_else_from_file():
    ref = reference(*V2)
    variables = weights.load_keras(ref.legacy_h5, v2_module(num_classes=4), (33, 33, 3))
    backbone = weights.load_keras(ref.legacy_h5, v2_module(), (33, 33, 3))
    assert variables["params"]["head"]["kernel"].shape[-1] == 4
    del variables["params"]["head"]
    jax.tree.map(np.testing.assert_array_equal, variables, backbone)


def test_save_and_load_roundtrip(tmp_path):
    ref = reference(*V2)
    variables = weights.load_keras(ref.keras3_h5, v2_module(), (33, 33, 3))
    weights.save_variables(tmp_path / "v.msgpack", variables)
    restored = weights.load_variables(tmp_path / "v.msgpack")
    jax.tree.map(np.testing.assert_array_equal, restored, jax.tree.map(np.asarray, variables))


def test_imagenet_urls_are_kerass():
    url, md5 = weights.imagenet_url("mobilenet_v2", 0.35, 96)
    assert url.endswith("mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5")
    url, md5 = weights.imagenet_url("mobilenet_v2", 1.0, 100)  # Keras falls back to 224
    assert url.endswith("_1.0_224_no_top.h5")
    assert weights.imagenet_url("resnet50_v2")[1] == "fac2f116257151a9d068a22e544a4917"
    with pytest.raises(ValueError, match="width"):
        weights.imagenet_url("mobilenet_v1", 0.3)


def test_imagenet_offline_error_names_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKFT_JAX_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights.urllib.request, "urlopen", offline)
    url, _ = weights.imagenet_url("mobilenet_v2", 0.35, 96)
    with pytest.raises(weights.WeightsError) as err:  # one line for the user: no traceback
        weights.imagenet_variables("mobilenet_v2", v2_module(), 96)
    assert url in str(err.value)
    assert str(tmp_path / "keras") in str(err.value)


class Served:
    """What urlopen gives: `body` in chunks (slowly: downloads overlap), announcing `length`."""

    def __init__(self, body: bytes, length: int):
        self.body, self.headers = io.BytesIO(body), email.message.Message()
        self.headers["Content-Length"] = str(length)

    def read(self, n=-1):
        time.sleep(0.002)
        return self.body.read(min(n, 4096) if n and n > 0 else 4096)

    def info(self):
        return self.headers

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def keras_like_file(path) -> bytes:
    with h5py.File(path, "w") as f:
        f.create_dataset("Conv1/Conv1/kernel:0", data=np.arange(40_000, dtype=np.float32))
    return path.read_bytes()


def test_a_download_cut_short_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    """MobileNet v2's files have no md5: a short download is caught by its length."""
    monkeypatch.setenv("BLOCKFT_JAX_CACHE", str(tmp_path / "cache"))
    body = keras_like_file(tmp_path / "source.h5")
    monkeypatch.setattr(weights.urllib.request, "urlopen",
                        lambda url, timeout=None: Served(body[:len(body) // 2], len(body)))
    with pytest.raises(weights.WeightsError, match="cut short"):
        weights.fetch_imagenet_file("mobilenet_v2", 0.35, 96)
    assert list((tmp_path / "cache" / "keras").iterdir()) == []  # no file, no part


def test_downloads_at_once_publish_one_whole_file(tmp_path, monkeypatch):
    """Two processes (hosts sharing a cache) downloading the same file at once: each writes
    its own temporary file, and the one published is whole."""
    monkeypatch.setenv("BLOCKFT_JAX_CACHE", str(tmp_path / "cache"))
    body = keras_like_file(tmp_path / "source.h5")
    monkeypatch.setattr(weights.urllib.request, "urlopen",
                        lambda url, timeout=None: Served(body, len(body)))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: weights.fetch_imagenet_file("mobilenet_v2", 0.35, 96),
                              range(3)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == body
    assert [p.name for p in paths[0].parent.iterdir()] == [paths[0].name]


def test_imagenet_file_placed_by_hand_is_converted_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKFT_JAX_CACHE", str(tmp_path))
    ref = reference("mobilenet_v2", 0.35, 96, ())
    url, _ = weights.imagenet_url("mobilenet_v2", 0.35, 96)
    placed = tmp_path / "keras" / url.rsplit("/", 1)[1]
    placed.parent.mkdir(parents=True)
    placed.write_bytes(ref.legacy_h5.read_bytes())
    module = v2_module(num_classes=5)
    variables = weights.imagenet_variables("mobilenet_v2", module, 96)
    assert list((tmp_path / "converted").glob("*.msgpack"))
    features = module.clone(num_classes=None).apply(
        {c: {k: v for k, v in variables[c].items() if k != "head"} for c in variables}, ref.x)
    np.testing.assert_allclose(features, ref.y, atol=1e-4 * np.abs(ref.y).max())
    again = weights.imagenet_variables("mobilenet_v2", module, 96)  # now from the cache
    np.testing.assert_array_equal(again["params"]["Conv1"]["kernel"],
                                  variables["params"]["Conv1"]["kernel"])


def test_convert_script(tmp_path):
    import subprocess
    import sys
    ref = reference(*V2)
    out = tmp_path / "v.msgpack"
    cmd = [sys.executable, "scripts/convert_keras_weights.py", "--model", "mobilenet_v2",
           "--width", "0.35", "--size", "33", "--keras", str(ref.keras3_h5), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    restored = weights.load_variables(out)
    module = v2_module()
    np.testing.assert_allclose(module.apply(restored, ref.x), ref.y,
                               atol=1e-4 * np.abs(ref.y).max())
    bad = subprocess.run(cmd[:-4] + ["--keras", "/nowhere.h5", "--out", str(out)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert bad.returncode != 0 and "nowhere.h5" in bad.stderr


def test_imagenet_classifier_in_file_is_skipped_explicitly(tmp_path):
    import keras
    from keras.src.legacy.saving import legacy_h5_format
    import h5py
    keras.backend.clear_session()
    model = keras.applications.MobileNetV2(include_top=True, weights=None, alpha=0.35,
                                           input_shape=(32, 32, 3), classes=7)
    model.save_weights(tmp_path / "top.weights.h5")
    with h5py.File(tmp_path / "top.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    backbone = keras.Model(model.input, model.get_layer("out_relu").output)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    expected = np.asarray(backbone(x))
    for name in ("top.h5", "top.weights.h5"):
        variables = weights.load_keras(tmp_path / name, v2_module(), (32, 32, 3))
        np.testing.assert_allclose(v2_module().apply(variables, x), expected,
                                   atol=1e-4 * np.abs(expected).max())
        with pytest.raises(weights.WeightsError, match="layers the model lacks"):
            weights.load_keras(tmp_path / name, v2_module(), (32, 32, 3), skip_top=False)


def test_demo_backbone_ships_with_the_package(monkeypatch, tmp_path):
    """configs/demo.py fine-tunes the shipped backbone: nothing pretrained, nothing cached, the
    file is package data; other digits are another backbone, pretrained here."""
    import fnmatch
    import tomllib

    from blockft_jax.search import plan, pretrained
    from configs import demo

    def no_pretraining(*args):
        raise AssertionError("pretrained although a backbone ships")

    monkeypatch.setenv("BLOCKFT_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrained, "_pretrain", no_pretraining)
    config = demo.get_config()
    name = pretrained.demo_file_name(config)
    module = plan.build_module(config, num_classes=len(config.data.classes))
    variables = pretrained.load(config, module)
    shipped = weights.load_variables(pretrained.SHIPPED_DIR / name)
    for collection, layers in shipped.items():
        for layer, leaves in layers.items():
            for key, value in leaves.items():
                np.testing.assert_array_equal(variables[collection][layer][key], value)
    assert models.HEAD_UNIT not in shipped["params"] and not list(tmp_path.iterdir())
    package_data = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["blockft_jax"]
    assert any(fnmatch.fnmatch(f"assets/{name}", pattern) for pattern in package_data)

    with config.unlocked():
        config.demo.pretrain_classes = (5, 6, 7, 8, 9)
    assert pretrained.demo_file_name(config) != name
    with pytest.raises(AssertionError, match="pretrained although"):
        pretrained.load(config, module)
