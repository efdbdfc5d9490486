"""Files of a Keras transfer model (the application nested in it, as Keras's transfer-learning
guide builds it) as starting weights: the backbone is found inside and converted bitwise, the
rest (pooling, dropout, the Dense head, the optimizer's state) skipped in one log line."""
import dataclasses
import functools
import logging
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from flax import traverse_util

from blockft_jax import models
from blockft_jax.inputs import weights
from keras_oracle import keras_constructor, keras_kwargs, randomise, saved_dir

SIZE = 32
WIDTHS = {"vgg16": 1.0, "mobilenet_v1": 0.25, "mobilenet_v2": 0.35, "mobilenet_v3_small": 0.75,
          "mobilenet_v3_large": 0.75, "resnet50_v2": 1.0}
# model.save("x.keras"), model.save("x.h5") (Keras 3 writes the legacy HDF5 format, and can
# for every family here) and model.save_weights("x.weights.h5"). A legacy weights-only h5 is
# not tested: Keras 3 refuses save_weights("x.h5"); only tf.keras 2 wrote one. Each family is
# built and saved once for all the tests (a few seconds each, ResNet50V2 and VGG16 the most).
FORMATS = ("keras", "h5", "weights.h5")
# Keras variable name -> the Flax (collection, name), written out here rather than taken from
# the module under test.
FLAX_NAMES = {"kernel": ("params", "kernel"), "bias": ("params", "bias"),
              "gamma": ("params", "scale"), "beta": ("params", "bias"),
              "moving_mean": ("batch_stats", "mean"), "moving_variance": ("batch_stats", "var")}
LOGGER = weights.__name__


@dataclasses.dataclass(frozen=True)
class SavedTransferModel:
    paths: dict        # format -> file
    application: str   # the nested application's name, e.g. 'mobilenetv2_0.35_32'
    arrays: dict       # the application's arrays as Flax variables: {(collection, layer, name)}


def transfer_model(application):
    """Input -> preprocessing -> application -> GlobalAveragePooling2D -> Dropout -> Dense."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = application(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


def keras_application(name, seed=0):
    keras.backend.clear_session()
    application = keras_constructor(name)(**keras_kwargs(name, WIDTHS[name], SIZE, ()))
    randomise(application, seed)  # BatchNorm moving statistics too
    return application


def flax_arrays(application) -> dict:
    """Every array of the Keras application, named and laid out as the Flax port's variable."""
    arrays = {}
    for layer in application.layers:
        for variable in layer.weights:
            value = keras.ops.convert_to_numpy(variable)
            if isinstance(layer, keras.layers.DepthwiseConv2D):  # a grouped convolution's kernel
                kh, kw, channels, multiplier = value.shape
                value = value.reshape(kh, kw, 1, channels * multiplier)
            collection, flax_name = FLAX_NAMES[variable.name]
            arrays[(collection, layer.name, flax_name)] = value
    return arrays


def save_all(model, directory: Path) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {fmt: directory / f"model.{fmt}" for fmt in FORMATS}
    model.save(paths["keras"])
    model.save(paths["h5"])
    model.save_weights(paths["weights.h5"])
    return paths


@functools.lru_cache(maxsize=None)
def saved_transfer_model(name) -> SavedTransferModel:
    application = keras_application(name)
    model = transfer_model(application)
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)  # the optimizer's state, as after fit
    # keras_oracle's directory: removed with its references when the tests end (1.4 GB).
    paths = save_all(model, saved_dir() / "transfer" / name)
    return SavedTransferModel(paths, application.name, flax_arrays(application))


def module(name, **options):
    return models.create(name, width=WIDTHS[name], **options)


def assert_backbone_converted_bitwise(path, name, expected_arrays):
    variables = weights.load_keras(path, module(name), (SIZE, SIZE, 3))
    converted = traverse_util.flatten_dict(variables)
    assert set(converted) == set(expected_arrays)  # every backbone variable, nothing else
    for key, value in expected_arrays.items():
        np.testing.assert_array_equal(np.asarray(converted[key]), value, err_msg=str(key))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", WIDTHS)
def test_every_family_in_every_format(name, fmt):
    saved = saved_transfer_model(name)
    assert_backbone_converted_bitwise(saved.paths[fmt], name, saved.arrays)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_rest_of_the_file_is_skipped_in_one_line(fmt, caplog):
    saved = saved_transfer_model("mobilenet_v2")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        weights.load_keras(saved.paths[fmt], module("mobilenet_v2"), (SIZE, SIZE, 3))
    [line] = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert saved.application in line and "skipped the rest: dense, optimizer" in line
    with pytest.raises(weights.WeightsError, match="layers the model lacks.*dense"):
        weights.load_keras(saved.paths[fmt], module("mobilenet_v2"), (SIZE, SIZE, 3),
                           skip_top=False)  # then the file must hold the backbone alone


def test_a_backbone_nested_two_deep(tmp_path):
    """A transfer model inside another model: a legacy h5 holds both models' weights in one
    group (its model_config tells whose layer is whose); Keras 3 nests their groups."""
    application = keras_application("mobilenet_v2", seed=1)
    inner = transfer_model(application)
    inputs = keras.Input((SIZE, SIZE, 3))
    outer = keras.Model(inputs, keras.layers.Dense(2, name="outer_head")(inner(inputs)))
    for path in save_all(outer, tmp_path).values():
        assert_backbone_converted_bitwise(path, "mobilenet_v2", flax_arrays(application))


def test_a_file_without_the_backbone_says_what_it_holds():
    saved = saved_transfer_model("mobilenet_v2")
    for path in saved.paths.values():
        with pytest.raises(weights.WeightsError) as err:
            weights.load_keras(path, module("mobilenet_v1"), (SIZE, SIZE, 3))
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"{path} holds no MobileNetV1 backbone (54 weighted layers)")
        assert f"'{saved.application}' (104 weighted layers, 0 of the 54 expected)" in message
        assert "'dense' (1 layer)" in message


def test_a_transfer_model_of_another_width_names_layer_shapes_and_nested_model():
    """Widths share layer names: the backbone is found and its first layer of another shape
    named, with both shapes."""
    saved = saved_transfer_model("mobilenet_v2")
    for path in saved.paths.values():
        with pytest.raises(weights.WeightsError) as err:
            weights.load_keras(path, models.create("mobilenet_v2", width=0.5), (SIZE, SIZE, 3))
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"{path} (nested model '{saved.application}'): shape "
                                  f"mismatch in layer 'block_1_project', 'kernel'")
        assert "(1, 1, 48, 8)" in message and "(1, 1, 48, 16)" in message


def test_a_keras_archive_without_weights_or_cut_short_is_refused(tmp_path):
    empty = tmp_path / "empty.keras"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("config.json", "{}")
    with pytest.raises(weights.WeightsError, match="without model.weights.h5"):
        weights.load_keras(empty, module("mobilenet_v2"), (SIZE, SIZE, 3))
    whole = saved_transfer_model("mobilenet_v2").paths["keras"].read_bytes()
    cut = tmp_path / "cut.keras"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(weights.WeightsError, match="truncated"):
        weights.load_keras(cut, module("mobilenet_v2"), (SIZE, SIZE, 3))


def test_a_backbone_lacking_a_layer_is_named_with_what_it_lacks(tmp_path):
    path = tmp_path / "model.weights.h5"
    path.write_bytes(saved_transfer_model("mobilenet_v2").paths["weights.h5"].read_bytes())
    with h5py.File(path, "a") as f:
        del f["layers/functional/layers/conv2d"]  # Conv1, the application's first Conv2D
    with pytest.raises(weights.WeightsError, match=r"'mobilenetv2_0.35_32' \(103 weighted "
                       r"layers, 103 of the 104 expected, lacking 'Conv1'\)"):
        weights.load_keras(path, module("mobilenet_v2"), (SIZE, SIZE, 3))
