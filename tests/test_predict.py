"""predict: a saved model classifies image files exactly as module.apply + softmax does on the
training data's decode and resize."""
import csv
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from blockft_jax import models, predict
from blockft_jax.engine import checkpoint
from blockft_jax.inputs import data

CLASSES = ["ant", "cat", "dog"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def coloured_images(n, size, seed=0):
    """Noisy images of one random colour each: unlike pure noise, they differ to a CNN."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n, 1, 1, 3))
    return np.clip(colours + rng.integers(-20, 21, (n, size, size, 3)), 0, 255).astype(np.uint8)


def random_variables(module, size, seed=0):
    """Random variables of keras_oracle's kind, drawn from the module's shapes (no compiled
    init): He-like kernels, BatchNorm statistics, scales and offsets away from their defaults
    (so inference-mode BatchNorm is really exercised). The head is then centred on a few
    coloured images and scaled up (at most 20x, so rounding noise stays far below the tests'
    tolerance), so the classes' probabilities differ from image to image where the random
    backbone lets them."""
    rng = np.random.default_rng(seed)
    shapes = traverse_util.flatten_dict(models.variable_shapes(module, (size, size, 3)))
    flat = {}
    for path, spec in shapes.items():
        shape = spec.shape
        if path[-1] == "var":
            value = rng.uniform(0.5, 1.5, shape)
        elif path[-1] == "scale":
            value = rng.uniform(0.7, 1.3, shape)
        elif path[-1] in ("mean", "bias"):
            value = rng.normal(0.0, 0.1, shape)
        else:  # kernels; a depthwise kernel (kh, kw, 1, in*m) has fan-in kh*kw too
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        flat[path] = value.astype(np.float32)
    variables = traverse_util.unflatten_dict(flat)
    variables.setdefault("batch_stats", {})
    head = variables["params"]["head"]
    head["bias"] = np.zeros_like(head["bias"])
    # The logits less their row mean (softmax's normaliser cancels), then centred per class.
    log_p = np.log(np.maximum(np.asarray(predict._probabilities(
        module, type(module).preprocessing, variables, coloured_images(4, size, seed + 1))),
        1e-30))
    logits = log_p - log_p.mean(axis=1, keepdims=True)
    scale = min(1.0 / max(float((logits - logits.mean(axis=0)).std()), 1e-9), 20.0)
    head["kernel"] = head["kernel"] * scale
    head["bias"] = (-logits.mean(axis=0) * scale).astype(np.float32)
    return variables


def make_saved_model(path, name="mobilenet_v2", *, size=32, width=1.0, dropout_rate=0.0,
                     options=None, class_names=CLASSES, seed=0, setting=None):
    """A models/<strategy> directory as the search writes it (checkpoint.save_model and the
    model.json keys of search.model_meta), with random variables. Returns (module, variables).
    """
    options = dict(options or {})
    module = models.create(name, num_classes=len(class_names), width=width,
                           dropout_rate=dropout_rate,
                           **{k: v for k, v in options.items() if v is not None})
    variables = random_variables(module, size, seed)
    meta = {"strategy": "layerwise", "candidate": "layerwise:x", "layers": ["x"], "seed": 0,
            "model": {"name": name, "width": width, "input_size": size, "weights": "random",
                      "dropout_rate": dropout_rate, "options": options},
            "input_size": size, "preprocessing": models.model_class(name).preprocessing,
            "class_names": list(class_names), "dataset": "image_folder",
            "setting": setting or {"bn_policy": "train", "lr_factor": 1.0,
                                   "head_learning_rate": None}}
    checkpoint.save_model(path, variables, meta)
    return module, variables


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("work") / "models" / "layerwise"
    # options as a search's model.json has them: unset ones are None.
    module, variables = make_saved_model(path, width=0.35, dropout_rate=0.2,
                                         options={"blocks": 2, "minimalistic": None})
    return path, module, variables


def _photos(root):
    """Five images of assorted sizes and modes, in a folder and a subfolder."""
    a, b, c, d, e = coloured_images(5, 64, seed=2)
    (root / "more").mkdir(parents=True)
    Image.fromarray(a[:32, :32]).save(root / "a.png")
    Image.fromarray(b[:50, :40]).save(root / "b.JPG")
    Image.fromarray(c[:20, :30]).convert("L").save(root / "more" / "c.png")
    Image.fromarray(np.dstack([d[:9, :9], d[:9, :9, :1]])).save(root / "more" / "d.png")
    Image.fromarray(e).save(root / "more" / "e.bmp")
    (root / "notes.txt").write_text("not an image, not looked at")
    return [root / "a.png", root / "b.JPG", root / "more" / "c.png", root / "more" / "d.png",
            root / "more" / "e.bmp"]


def _direct(module, variables, files):
    """Softmax of a plain module.apply on the training pipeline's decode and resize."""
    images = np.stack([data.read_image(f, 32) for f in files])
    apply = jax.jit(lambda v, x: module.apply(v, data.preprocess(x, "tf"), train=False))
    return np.asarray(jax.nn.softmax(apply(variables, images), axis=-1))


def test_classify_equals_module_apply(saved, tmp_path):
    path, module, variables = saved
    files = _photos(tmp_path / "photos")
    model = predict.load(path)
    assert model.class_names == CLASSES and model.input_size == 32
    found = predict.image_files([tmp_path / "photos"])
    assert found == sorted(files)
    classified, probabilities, skipped = predict.classify(model, found, batch_size=2)
    assert classified == found and skipped == []
    np.testing.assert_allclose(probabilities, _direct(module, variables, found), atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    assert len(set(probabilities.argmax(axis=1))) > 1  # a test that can tell images apart
    # The resize is PIL's bilinear on RGB, as for every dataset.
    with Image.open(files[1]) as image:
        expected = np.asarray(image.convert("RGB").resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(data.read_image(files[1], 32), expected)


def test_main_csv_top_k_and_unreadable_files(saved, tmp_path, capsys):
    path, module, variables = saved
    files = _photos(tmp_path / "photos")
    (tmp_path / "photos" / "broken.jpg").write_text("not an image")
    status = predict.main(["--model", str(path), str(tmp_path / "photos"), "--top", "2",
                           "--batch-size", "4"])
    out, err = capsys.readouterr()
    assert status == 0
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["path", "class", "probability", "class_2", "probability_2"]
    assert [r[0] for r in rows[1:]] == [str(f) for f in sorted(files)]
    expected = _direct(module, variables, sorted(files))
    for row, p in zip(rows[1:], expected):
        first, second = np.argsort(-p)[:2]
        assert row[1] == CLASSES[first] and row[3] == CLASSES[second]
        np.testing.assert_allclose([float(row[2]), float(row[4])], p[[first, second]], atol=1e-6)
    assert err.strip() == (f"warning: skipped {tmp_path / 'photos' / 'broken.jpg'}: "
                           "not an image PIL can decode")


def test_main_exit_status_2_with_one_line(saved, tmp_path, capsys):
    path, _, _ = saved
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    (tmp_path / "none").mkdir()
    _photos(tmp_path / "photos")
    cases = {
        "none of the 1 image file(s) could be read": [str(path), str(tmp_path / "bad")],
        "no image files": [str(path), str(tmp_path / "none")],
        "is not a saved model": [str(tmp_path), str(tmp_path / "photos")],
        "--top must be between 1 and 3": [str(path), str(tmp_path / "photos"), "--top", "4"],
        "--batch_size must be at least 1": [str(path), str(tmp_path / "photos"),
                                            "--batch-size", "0"],
    }
    for message, (model, *rest) in cases.items():
        assert predict.main(["--model", model, *rest]) == 2, message
        out, err = capsys.readouterr()
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert out == "" and len(errors) == 1 and message in errors[0], (message, err)


def test_cli_with_relative_paths(saved, tmp_path):
    path, module, variables = saved
    files = _photos(tmp_path / "photos")
    (tmp_path / "models").symlink_to(path.parent)  # WORKDIR/models/<strategy>, as a search has
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "blockft_jax.predict", "--model", "models/layerwise", "photos",
         "photos/a.png"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    ordered = sorted(files) + [files[0]]
    assert [r[0] for r in rows[1:]] == [str(f.relative_to(tmp_path)) for f in ordered]
    expected = _direct(module, variables, ordered)
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], expected.max(axis=1), atol=1e-6)
