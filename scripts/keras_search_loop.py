#!/usr/bin/env python
"""The offline demo's search as a Keras user would write it: the baseline for the demo's speed.

    python scripts/keras_search_loop.py [--backend tensorflow|jax] [--runs N] [--config FILE]

The same runs as `python -m blockft_jax.main --config configs/demo.py` (candidates derived from
blockft_jax: `plan.candidates` on the layer table, in the search's strategy order; top-k from
this loop's own layer-wise ranking, `results.rank`), each (candidate, seed) trained by a plain
Keras loop: one keras.applications.MobileNetV2(alpha, include_top=False, weights=None) + global
average pooling + Dense head, built once; per run its weights are set to the config's starting
backbone (blockft_jax's `pretrained.load`: for the demo, its backbone pretrained on digits 0-4;
mapped into Keras by layer name, checked once on logits) and a fresh head drawn from the seed, `trainable` set per layer (the run's layers and the head: Keras runs a
frozen BatchNorm in inference mode, as blockft_jax does), then compile (Adam, the config's
learning rate) and fit with validation_data for the config's epochs and batch size, keeping
the best epoch's weights (EarlyStopping(restore_best_weights) with patience = epochs: the
strictly best validation accuracy, as blockft_jax's search) and evaluating the test split with
them. Images go through Keras's own `preprocess_input`, once, outside the timed runs.

Prints each run's seconds and best validation accuracy, then the total wall seconds of the runs
and the mean per run. `--runs N` trains only the first N runs and also prints the whole search's
time EXTRAPOLATED from their mean (clearly labelled; the loop's per-run cost hardly depends on
the candidate: every run compiles and fits the same model). Setup (data, backbone, building the
model) is timed separately.

`--backend` picks Keras's backend (KERAS_BACKEND, set before Keras is imported; default
tensorflow). The demo backbone is read from blockft_jax's cache (pretrained there once, about a
minute on a 2-core CPU, if no demo search ran before).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("tensorflow", "jax")
# blockft_jax model name -> the keras.applications module holding its preprocess_input.
KERAS_APPLICATION_MODULE = {"vgg16": "vgg16", "mobilenet_v1": "mobilenet",
                            "mobilenet_v2": "mobilenet_v2", "mobilenet_v3_small": "mobilenet_v3",
                            "mobilenet_v3_large": "mobilenet_v3", "resnet50_v2": "resnet_v2"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="tensorflow")
    parser.add_argument("--runs", type=int, default=None,
                        help="train only the first N runs and extrapolate the whole search")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.py"),
                        help="a config file (default: the offline demo's)")
    return parser.parse_args(argv)


def load_config(path: str):
    sys.path.insert(0, str(ROOT))  # config files import `configs.default`
    spec = importlib.util.spec_from_file_location("search_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def keras_weights(layer, variables) -> list:
    """A Keras layer's weights, in its own order, from blockft_jax variables (the inverse of
    weights.load_keras: depthwise (kh, kw, 1, c) -> (kh, kw, c, 1); BN scale/bias/mean/var ->
    gamma/beta/moving_mean/moving_variance)."""
    import numpy as np
    from blockft_jax.inputs import weights as weights_lib

    arrays = []
    kinds = dict(weights_lib.KERAS_VARIABLES[type(layer).__name__])
    for w in layer.weights:
        name = weights_lib.ALIASES.get(w.name.split("/")[-1].split(":")[0],
                                       w.name.split("/")[-1].split(":")[0])
        collection, flax_name = kinds[name]
        value = np.asarray(variables[collection][layer.name][flax_name])
        if type(layer).__name__ == "DepthwiseConv2D":
            kh, kw, _, c = value.shape
            value = value.reshape(kh, kw, c, 1)
        if tuple(value.shape) != tuple(w.shape):
            raise ValueError(f"{layer.name}/{name}: blockft_jax has {value.shape}, Keras "
                             f"{tuple(w.shape)}.")
        arrays.append(value)
    return arrays


def check_mapping(keras, model, module, backbone, images, shape) -> None:
    """The Keras model with the mapped weights (and one head) computes blockft_jax's logits."""
    import jax
    import numpy as np
    from blockft_jax.inputs import data as data_lib
    from blockft_jax import models

    variables = {**backbone, "params": {**backbone["params"],
                                        models.HEAD_UNIT: models.init_head(module, shape)}}
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(keras_weights(layer, variables))
    preprocess = lambda x: data_lib.preprocess(x, module.preprocessing)
    want = np.asarray(jax.jit(lambda v, x: module.apply(v, preprocess(x), train=False))(
        variables, images))
    got = np.asarray(model(np.asarray(preprocess(images)), training=False))
    if not np.allclose(got, want, rtol=1e-3, atol=1e-3):
        raise ValueError(f"Keras with the mapped weights differs from blockft_jax: max "
                         f"|difference| {np.max(np.abs(got - want)):.2e} in the logits.")
    print(f"Weights mapped: Keras's logits match blockft_jax's (max |difference| "
          f"{np.max(np.abs(got - want)):.1e} on {len(images)} images).")


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend  # read once, when Keras is first imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "keras" in sys.modules:
        raise RuntimeError("Keras was imported before its backend was chosen.")
    setup_started = time.perf_counter()

    import jax
    import numpy as np

    from blockft_jax.inputs import data as data_lib
    from blockft_jax import models
    from blockft_jax.search import plan, pretrained, results
    from blockft_jax.candidates import strategies

    config = load_config(args.config)
    c = config
    dataset = data_lib.load_from_config(c)  # the search's own images and splits
    module = plan.build_module(c, len(dataset.class_names))
    shape = (c.model.input_size, c.model.input_size, 3)
    table = models.layer_table(module, shape)
    # The config's starting weights (the demo's: its backbone pretrained on digits 0-4); the
    # head is drawn per run.
    start = jax.device_get(pretrained.load(c, module))
    backbone = {k: {name: v for name, v in tree.items() if name != models.HEAD_UNIT}
                for k, tree in start.items()}

    import keras  # after KERAS_BACKEND

    entry = models.REGISTRY[c.model.name]
    has_width, constructor = entry.has_width, entry.keras_name
    options = dict(include_top=False, weights=None, input_shape=shape)
    if has_width:
        options["alpha"] = c.model.width
    base = getattr(keras.applications, constructor)(**options)
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    head = keras.layers.Dense(len(dataset.class_names), name=models.HEAD_UNIT)(pooled)
    model = keras.Model(base.input, head)
    weighted = [layer for layer in model.layers if layer.weights]
    ours = {r.name for r in table if r.has_weights}
    theirs = {layer.name for layer in weighted}
    if ours != theirs:
        raise ValueError(f"Layer names differ: only blockft_jax {sorted(ours - theirs)[:5]}, "
                         f"only Keras {sorted(theirs - ours)[:5]}.")
    start_weights = {layer.name: keras_weights(layer, backbone) for layer in weighted
                     if layer.name != models.HEAD_UNIT}
    check_mapping(keras, model, module, backbone, dataset.validation.images[:8], shape)
    application = getattr(keras.applications, KERAS_APPLICATION_MODULE[c.model.name])
    preprocess = application.preprocess_input
    x = {name: preprocess(getattr(dataset, name).images.astype(np.float32))
         for name in ("train", "validation", "test")}
    y = {name: getattr(dataset, name).labels.astype(np.int32)
         for name in ("train", "validation", "test")}
    setup_seconds = time.perf_counter() - setup_started

    # Keras trains a layer or not: no per-layer learning rate, no mask changing by epoch.
    searched = [s for s in strategies.SEARCH_ORDER if s in c.search.strategies
                and s not in strategies.ONE_RUN_METHODS]
    left_out = [s for s in strategies.ONE_RUN_METHODS if s in c.search.strategies]
    if left_out:
        print(f"Left out (Keras has no per-layer learning rate): {', '.join(left_out)}.")
    planned = {s: plan.candidates(c, table, s) for s in searched if s != "topk"}
    total_runs = (sum(len(g) for g in planned.values()) +
                  (len(c.search.topk) if "topk" in searched else 0)) * c.train.seeds
    limit = total_runs if args.runs is None else min(args.runs, total_runs)
    print(f"Keras {keras.__version__} on {keras.backend.backend()}: {c.model.name} width "
          f"{c.model.width} at {c.model.input_size} px, {len(y['train'])} train / "
          f"{len(y['validation'])} validation / {len(y['test'])} test images, {c.train.epochs} "
          f"epochs, batch {c.data.batch_size}, Adam {c.train.learning_rate}; {total_runs} runs "
          f"in the search, training {limit}. Setup {setup_seconds:.1f} s.", flush=True)

    def train_run(group, seed) -> dict:
        started = time.perf_counter()
        keras.utils.set_random_seed(seed)
        for layer in weighted:
            if layer.name == models.HEAD_UNIT:
                kernel, bias = layer.weights
                layer.set_weights([keras.initializers.GlorotUniform(seed)(kernel.shape),
                                   np.zeros(bias.shape, np.float32)])
            else:
                layer.set_weights(start_weights[layer.name])
        trained = set(group.layers) | {models.HEAD_UNIT}
        for layer in model.layers:
            layer.trainable = layer.name in trained
        model.compile(optimizer=keras.optimizers.Adam(c.train.learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        best = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max",
                                             patience=c.train.epochs,
                                             restore_best_weights=True)
        history = model.fit(x["train"], y["train"], batch_size=c.data.batch_size,
                            epochs=c.train.epochs, validation_data=(x["validation"],
                                                                    y["validation"]),
                            callbacks=[best], shuffle=True, verbose=0).history
        test = model.evaluate(x["test"], y["test"], batch_size=c.data.batch_size, verbose=0,
                              return_dict=True)
        val = history["val_accuracy"]
        return {"strategy": group.strategy, "candidate": group.candidate,
                "layers": list(group.layers), "depth": 0, "seed": seed, "status": "ok",
                "val_accuracy": float(max(val)), "best_epoch": int(np.argmax(val)) + 1,
                "test_accuracy": float(test["accuracy"]),
                "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
                "seconds": time.perf_counter() - started}

    rows = []
    loop_started = time.perf_counter()
    for strategy in searched:
        if len(rows) >= limit:
            break
        if strategy == "topk":
            ranking = [r["layers"][0] for r in results.rank(
                [row for row in rows if row["strategy"] == "layerwise"])]
            planned["topk"] = plan.candidates(c, table, "topk", ranking)
        for group in planned[strategy]:
            for seed in range(c.train.seeds):
                if len(rows) >= limit:
                    break
                row = train_run(group, seed)
                rows.append(row)
                print(f"[{len(rows)}/{total_runs}] {row['candidate']:<40} seed {seed}: "
                      f"val {row['val_accuracy']:.3f} (epoch {row['best_epoch']}) test "
                      f"{row['test_accuracy']:.3f}, {row['trainable_params']} trainable "
                      f"params, {row['seconds']:.2f} s", flush=True)
    wall = time.perf_counter() - loop_started
    per_run = wall / max(len(rows), 1)
    seconds = ", ".join(f"{row['seconds']:.2f}" for row in rows)
    print(f"Keras loop ({keras.backend.backend()}): {len(rows)} runs in {wall:.1f} s wall "
          f"({per_run:.2f} s per run; per-run seconds {seconds}); setup {setup_seconds:.1f} s.")
    if len(rows) < total_runs:
        print(f"EXTRAPOLATED (from {len(rows)} of {total_runs} runs): the whole search would take "
              f"about {per_run * total_runs:.0f} s ({total_runs} x {per_run:.2f} s) plus setup.")


if __name__ == "__main__":
    main()
