"""Keras-made reference models: keras.applications with randomised weights (BN moving
statistics too), saved in both Keras formats, with their outputs on a fixed input."""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402

from blockft_jax import models  # noqa: E402


@functools.lru_cache(maxsize=None)
def saved_dir() -> Path:
    """Where this process saves the reference models, and test_keras_files its transfer
    models (made when first needed)."""
    return Path(tempfile.mkdtemp(prefix="keras_oracle_"))


def remove_saved_files() -> None:
    """The saved models (references about 380 MB a process, test_keras_files' 1.4 GB) gone at
    the end of the tests (conftest.py): left behind, every run filled the temporary directory."""
    if saved_dir.cache_info().currsize:
        shutil.rmtree(saved_dir(), ignore_errors=True)
    saved_dir.cache_clear()
    reference.cache_clear()


@dataclasses.dataclass(frozen=True)
class Reference:
    name: str
    width: float
    size: int
    options: tuple
    legacy_h5: Path           # tf.keras-style .h5 (the keras-applications format)
    keras3_h5: Path           # Keras 3 .weights.h5
    x: np.ndarray             # preprocessed input batch
    y: np.ndarray             # Keras's output on x
    layers: tuple             # ((name, class name), ...) as keras_model.layers lists them
    param_count: int


def keras_constructor(name):
    return getattr(keras.applications, models.REGISTRY[name].keras_name)


def keras_kwargs(name, width, size, options):
    kwargs = dict(include_top=False, weights=None, input_shape=(size, size, 3), **dict(options))
    if models.REGISTRY[name].has_width:
        kwargs["alpha"] = width
    return kwargs


def randomise(model, seed):
    """Replaces every weight with random values of a similar scale; BN moving variance stays
    positive. Non-default moving statistics make inference-mode BN a real test."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for w in layer.weights:
            shape, name = tuple(w.shape), w.name
            if name == "moving_variance":
                value = rng.uniform(0.5, 1.5, shape)
            elif name == "gamma":
                value = rng.uniform(0.7, 1.3, shape)
            elif name in ("beta", "moving_mean", "bias"):
                value = rng.normal(0.0, 0.1, shape)
            else:  # kernels: He-like scale keeps activations from exploding or vanishing
                fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
                if "Depthwise" in type(layer).__name__:
                    fan_in = int(np.prod(shape[:2]))
                value = rng.normal(0.0, np.sqrt(1.0 / fan_in), shape)
            w.assign(value.astype("float32"))


def preprocessed_input(name, size, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 255.0, (batch, size, size, 3)).astype("float32")
    mode = models.model_class(name).preprocessing
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "caffe":
        return x[..., ::-1] - np.array([103.939, 116.779, 123.68], "float32")
    return x  # 'raw': the model rescales itself


@functools.lru_cache(maxsize=None)
def reference(name, width=1.0, size=32, options=(), seed=0) -> Reference:
    keras.backend.clear_session()  # automatic layer names start from zero, as in a fresh run
    model = keras_constructor(name)(**keras_kwargs(name, width, size, options))
    randomise(model, seed)
    tag = f"{name}_{width}_{size}_{'_'.join(f'{k}{v}' for k, v in options)}_{seed}"
    keras3 = saved_dir() / f"{tag}.weights.h5"
    legacy = saved_dir() / f"{tag}.h5"
    model.save_weights(keras3)
    import h5py
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    x = preprocessed_input(name, size, seed=seed)
    y = np.asarray(model.predict_on_batch(x))  # one program: op by op took 8x longer (empty cache)
    layers = tuple((l.name, type(l).__name__) for l in model.layers
                   if type(l).__name__ != "InputLayer")
    return Reference(name, width, size, options, legacy, keras3, x, y, layers,
                     model.count_params())
