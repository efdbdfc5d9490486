"""export: the .keras file is Keras's own application model, classifies like predict, and
loads in a process that never imports blockft_jax."""
import os
import subprocess
import sys

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from blockft_jax import export, predict  # noqa: E402
from test_predict import coloured_images, make_saved_model  # noqa: E402


def _logits(probabilities):
    """Logits up to a per-row constant (removed): log-probabilities less their row mean."""
    log_p = np.log(np.maximum(probabilities.astype(np.float64), 1e-37))
    return log_p - log_p.mean(axis=1, keepdims=True)


@pytest.mark.parametrize("name, width, options", [
    ("mobilenet_v2", 0.35, {}),
    ("resnet50_v2", 1.0, {}),
    # A depth multiplier of 2: the depthwise kernels' (kh,kw,1,in*m) -> (kh,kw,in,m) order.
    ("mobilenet_v1", 0.25, {"depth_multiplier": 2, "depthwise_impl": "native"}),
    # Keras's own Rescaling inside the model ('raw' preprocessing) and a Keras option.
    ("mobilenet_v3_small", 0.75, {"minimalistic": True, "include_preprocessing": None}),
])
def test_keras_model_classifies_like_predict(tmp_path, name, width, options):
    make_saved_model(tmp_path / "m", name, width=width, dropout_rate=0.2, options=options)
    saved = predict.load(tmp_path / "m")
    model = export.keras_model(saved)
    images = coloured_images(4, 32, seed=5)
    expected = saved.probabilities(images)
    got = model.predict(images, verbose=0)  # uint8 in
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # Probabilities near 0 or 1 hide differences: compare the logits they imply, too.
    np.testing.assert_allclose(_logits(got), _logits(expected), atol=1e-3)
    assert model.get_layer("head").activation is keras.activations.softmax
    assert model.get_layer("head_dropout").rate == 0.2
    keras_name = {"mobilenet_v1": "MobileNet", "mobilenet_v2": "MobileNetV2",
                  "resnet50_v2": "ResNet50V2", "mobilenet_v3_small": "MobileNetV3Small"}[name]
    reference = getattr(keras.applications, keras_name)(**export.keras_arguments(saved.meta))
    backbone_weights = [w for w in model.weights if not w.path.startswith("head")]
    assert [tuple(w.shape) for w in backbone_weights] == [tuple(w.shape)
                                                          for w in reference.weights]


def test_vgg16_file_loads_without_blockft_jax(tmp_path, monkeypatch, capsys):
    """Caffe preprocessing (BGR, mean subtracted) is built-in layers only: a fresh process
    loads the file with Keras alone and gets predict's probabilities."""
    make_saved_model(tmp_path / "work" / "models" / "full", "vgg16", dropout_rate=0.0)
    images = coloured_images(3, 32, seed=7)
    np.save(tmp_path / "images.npy", images)
    monkeypatch.chdir(tmp_path)  # relative paths, as users type them
    assert export.main(["--model", "work/models/full", "--out", "exported/vgg16.keras"]) == 0
    assert capsys.readouterr().out.strip() == f"Wrote {tmp_path / 'exported' / 'vgg16.keras'}"
    assert os.listdir(tmp_path / "exported") == ["vgg16.keras"]
    load = ("import sys, numpy as np, keras\n"
            "model = keras.saving.load_model('exported/vgg16.keras')\n"
            "assert not [m for m in sys.modules if m.startswith('blockft_jax')]\n"
            "np.save('keras.npy', model.predict(np.load('images.npy'), verbose=0))\n")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", load], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    expected = predict.load(tmp_path / "work" / "models" / "full").probabilities(images)
    np.testing.assert_allclose(np.load(tmp_path / "keras.npy"), expected, atol=1e-4)


def test_export_errors_are_one_line(tmp_path, capsys, monkeypatch):
    make_saved_model(tmp_path / "tiny", "mobilenet_v2", width=0.35, options={"blocks": 2})
    cases = {
        "Model option blocks=2 has no counterpart in keras.applications.MobileNetV2":
            ["--model", str(tmp_path / "tiny"), "--out", str(tmp_path / "x.keras")],
        "--out must end in .keras": ["--model", str(tmp_path / "tiny"), "--out",
                                     str(tmp_path / "x.h5")],
        "is not a saved model": ["--model", str(tmp_path), "--out", str(tmp_path / "x.keras")],
    }
    for message, argv in cases.items():
        assert export.main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x.keras").exists()

    monkeypatch.setitem(sys.modules, "keras", None)  # as if Keras were not installed
    with pytest.raises(export.ExportError, match=r"pip install -e '\.\[keras\]'"):
        export._import_keras()


@pytest.mark.parametrize("policy", ["train", "frozen"])
def test_the_bn_policy_travels_to_keras(tmp_path, policy):
    """A model trained with every BatchNorm in inference mode exports with Keras's BN layers
    non-trainable (Keras then keeps them in inference mode when fine-tuned on); 'train' keeps
    Keras's default."""
    make_saved_model(tmp_path / "m", "mobilenet_v2", width=0.35,
                     setting={"bn_policy": policy, "lr_factor": 1.0, "head_learning_rate": None})
    model = export.keras_model(predict.load(tmp_path / "m"))
    batchnorms = [layer for layer in model.layers
                  if isinstance(layer, keras.layers.BatchNormalization)]
    assert batchnorms and {layer.trainable for layer in batchnorms} == {policy == "train"}


@pytest.mark.parametrize("name, width, options", [
    ("mobilenet_v2", 0.35, {}),
    ("mobilenet_v3_small", 0.75, {"minimalistic": True, "include_preprocessing": None}),
])
def test_an_exported_model_seeds_the_next_search_bitwise(tmp_path, name, width, options):
    """export's .keras file, given back as model.weights, is the exported backbone, bitwise:
    a search can start where the last one ended."""
    from flax import traverse_util

    from blockft_jax import models
    from blockft_jax.inputs import weights
    _, variables = make_saved_model(tmp_path / "m", name, width=width, options=options)
    export.keras_model(predict.load(tmp_path / "m")).save(tmp_path / "m.keras")
    module = models.create(name, width=width,
                           **{k: v for k, v in options.items() if v is not None})
    got = traverse_util.flatten_dict(weights.load_keras(tmp_path / "m.keras", module,
                                                        (32, 32, 3)))
    want = traverse_util.flatten_dict({c: {k: v for k, v in tree.items() if k != "head"}
                                       for c, tree in variables.items()})
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]),
                                      err_msg=str(key))


def test_dry_run_checks_a_keras_file_before_training(tmp_path):
    """--dry_run converts a Keras file given as model.weights: the demo's model takes an
    exported MobileNetV2 at its width; another width is one line naming the mismatch."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for width in (0.35, 0.5):
        make_saved_model(tmp_path / f"m{width}", "mobilenet_v2", width=width)
        export.keras_model(predict.load(tmp_path / f"m{width}")).save(
            tmp_path / f"m{width}.keras")

    def dry_run(width):
        return subprocess.run(
            [sys.executable, "-m", "blockft_jax.main", "--config", "configs/demo.py",
             f"--config.model.weights={tmp_path / f'm{width}.keras'}", "--dry_run",
             f"--workdir={tmp_path / 'wd'}"], cwd=root, capture_output=True, text=True)
    good, bad = dry_run(0.35), dry_run(0.5)
    assert good.returncode == 0, good.stderr[-2000:]
    assert "Keras file: the backbone found and converted" in good.stdout
    assert bad.returncode == 2 and "shape mismatch" in bad.stderr, bad.stderr[-2000:]
    assert len([line for line in bad.stderr.splitlines() if "error:" in line]) == 1


def test_a_keras_file_is_converted_once_per_process(tmp_path, monkeypatch):
    """The launcher checks the inputs before its log file opens and the search again before
    its workdir: a user's Keras file is converted once for both; a changed file again."""
    from blockft_jax.inputs import weights
    from blockft_jax.search import plan
    from configs import demo
    make_saved_model(tmp_path / "m", "mobilenet_v2", width=0.35)
    export.keras_model(predict.load(tmp_path / "m")).save(tmp_path / "m.keras")
    config = demo.get_config()
    config.model.weights = str(tmp_path / "m.keras")
    converted, load_keras = [], weights.load_keras
    monkeypatch.setattr(weights, "load_keras",
                        lambda *args, **kwargs: converted.append(1) or load_keras(*args,
                                                                                  **kwargs))
    first = plan.check_inputs(config)
    assert plan.check_inputs(config) == first and len(converted) == 1
    os.utime(tmp_path / "m.keras", ns=(1, 1))  # another file state: converted again
    plan.check_inputs(config)
    assert len(converted) == 2
