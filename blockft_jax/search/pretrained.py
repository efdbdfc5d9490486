"""Where a search's starting weights come from: Keras ImageNet files, a file of the user's, or
the offline demo backbone (pretrained on digits 0-4: shipped with the package for the demo's
model, else pretrained here once, then cached)."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from blockft_jax import models
from blockft_jax.candidates import groups
from blockft_jax.common import multihost
from blockft_jax.engine import cohort as cohort_lib
from blockft_jax.engine import train
from blockft_jax.inputs import data as data_lib
from blockft_jax.inputs import weights
from blockft_jax.models import HEAD_UNIT

log = logging.getLogger(__name__)

# The demo backbones that ship with the package (made by scripts/make_demo_backbone.py): every
# machine fine-tunes the same backbone, whatever its float order, without pretraining it.
SHIPPED_DIR = Path(__file__).parents[1] / "assets"
# Part of the demo backbone's cache key: raise it when a change to the code changes the backbone
# pretraining gives (2: BatchNorm statistics over real rows only, not the padded ones).
DEMO_RECIPE = 2
DEMO_BATCH, DEMO_SPLIT_SEED = 25, 0  # the pretraining's, whatever the search's


def load(config, module) -> dict:
    """Starting variables for `module` as `config.model.weights` says."""
    source = config.model.weights
    size = config.model.input_size
    shape = (size, size, 3)
    if source == "imagenet":
        return weights.imagenet_variables(config.model.name, module, size)
    if source == "random":
        return models.init_variables(module, shape)
    if source == "demo":
        return weights.with_fresh_head(module, demo_backbone(config, module), shape)
    path = Path(source)
    if not path.exists():
        raise weights.WeightsError(
            f"model.weights={source!r}: no such file. Use 'imagenet', 'random', 'demo' or a "
            f"path to a Keras .h5, .weights.h5 or .keras file or a converted .msgpack.")
    if path.suffix == ".msgpack":
        return weights.with_fresh_head(module, weights.load_variables(path), shape)
    return weights.load_keras(path, module, shape)


def _progress(epochs: int, every_seconds: float = 5.0):
    """The pretraining's epoch hook (cohort.fit's): a line when `every_seconds` have passed
    since the last one, and after the last epoch."""
    started = last = time.perf_counter()

    def log_epoch(epoch, state, histories):
        nonlocal last
        now = time.perf_counter()
        if now - last >= every_seconds or epoch == epochs:
            last = now
            record = histories[0][-1]
            # Validation waits for the BN statistics recalibrated at the end (recalibrate_bn).
            log.info("Demo backbone: epoch %d/%d, train loss %.3f, train accuracy %.3f "
                     "(%.0f s so far)", epoch, epochs, record["train_loss"],
                     record["train_accuracy"], now - started)
    return log_epoch


def demo_file_name(config) -> str:
    """The demo backbone's file name: the model and a hash of everything that shapes it."""
    options = {k: v for k, v in config.model.options.items() if v is not None}
    key = json.dumps({"model": config.model.name, "width": config.model.width,
                      "size": config.model.input_size, "options": options,
                      "classes": list(config.demo.pretrain_classes),
                      "epochs": config.demo.pretrain_epochs,
                      "learning_rate": config.demo.pretrain_learning_rate,
                      "recipe": DEMO_RECIPE},
                     sort_keys=True)
    return f"{config.model.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.msgpack"


def demo_backbone(config, module, *, pretrain: bool = False) -> dict:
    """A backbone trained on digits `demo.pretrain_classes` (all their training images): the
    one shipped with the package when there is one for this model config, else pretrained here
    once and cached (always, with `pretrain`). The search then fine-tunes it on a few examples
    of other digits: a genuine transfer task."""
    name = demo_file_name(config)
    shipped, path = SHIPPED_DIR / name, weights.cache_dir() / "demo" / name
    # Process 0 decides and, when it has the file, gives its variables to every process: a
    # process that lacked it would pretrain alone over the global mesh and wait for ever.
    found = multihost.broadcast_json(lambda: next(
        (str(s) for s in ([] if pretrain else [shipped, path]) if s.exists()), None))
    if found is not None:
        log.info("Demo backbone: %s", found)
        return _from_leader(lambda: weights.load_variables(found))
    classes = tuple(config.demo.pretrain_classes)
    log.info("Pretraining the demo backbone on digits %s (once; cached at %s)", classes, path)
    return _pretrain(config, module, classes, path)


def _from_leader(load) -> dict:
    """Variables `load()` gives on process 0, on every process (their shapes sent first)."""
    if jax.process_count() == 1:
        return load()
    loaded = load() if multihost.is_leader() else None
    spec = multihost.broadcast_json(lambda: {
        "/".join(k): [list(v.shape), str(v.dtype)]
        for k, v in traverse_util.flatten_dict(loaded).items()})
    like = traverse_util.unflatten_dict({tuple(k.split("/")): np.zeros(shape, dtype)
                                         for k, (shape, dtype) in spec.items()})
    return multihost.broadcast_arrays(lambda: loaded, like)


def _pretrain(config, module, classes, path: Path) -> dict:

    # Its own batch and split, whatever the search's: the backbone depends only on its key.
    digits = data_lib.load_dataset("digits", image_size=config.model.input_size,
                                   classes=classes, seed=DEMO_SPLIT_SEED)
    # Without dropout, whatever the search's: the backbone depends only on its cache key.
    net = module.clone(num_classes=len(classes), dropout_rate=0.0)
    variables = models.init_variables(net, digits.train.images.shape[1:], jax.random.key(1))
    table = models.layer_table(net, digits.train.images.shape[1:])
    everything = groups.full(table)[0].layers
    batch = DEMO_BATCH
    steps = config.demo.pretrain_epochs * -(-len(digits.train.labels) // batch)
    cfg = config.train.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.learning_rate, cfg.epochs = config.demo.pretrain_learning_rate, config.demo.pretrain_epochs
    engine = train.Engine(net, train.make_optimizer(cfg, steps), net.unit_names()[0],
                          train.data_mesh(), table=table)
    cohort = cohort_lib.Cohort(engine, 1)  # one run: a cohort of one
    run = cohort_lib.Run(groups.param_mask(variables["params"], table, everything),
                         groups.bn_modes(table, everything), seed=0)
    result, = cohort_lib.fit(cohort, variables, [run], digits.train, digits.validation, None,
                             epochs=config.demo.pretrain_epochs, batch_size=batch,
                             on_epoch_end=_progress(config.demo.pretrain_epochs))
    trained = recalibrate_bn(net, result.final_variables, digits.train.images)
    accuracy = cohort_lib.evaluate(cohort, cohort.shared_part(trained), jax.tree.map(
        lambda x: x[None], cohort.live_variables(trained)), digits.validation, batch)[0]["accuracy"]
    log.info("Demo backbone: %.1f%% validation accuracy on digits %s", 100 * accuracy,
             ", ".join(map(str, classes)))
    backbone = {c: {k: v for k, v in trained[c].items() if k != HEAD_UNIT} for c in trained}
    weights.save_variables(path, backbone)
    return backbone


def recalibrate_bn(module: models.Backbone, variables, images: np.ndarray) -> dict:
    """Sets every BN's moving statistics to the statistics of `images` under the current
    weights. Training from scratch with Keras's BN momentum (0.999) leaves the moving averages
    far from the real statistics after a few hundred steps; this makes inference-mode BN match
    the trained network (used for the demo's pretraining)."""
    x = data_lib.preprocess(jnp.asarray(images), type(module).preprocessing)
    _, state = jax.jit(lambda v, x: module.apply(v, x, train=True,
                                                 mutable=["batch_stats", "bn_batch_stats"]))(
        variables, x)
    return dict(variables, batch_stats=jax.tree.map(jnp.asarray, dict(state["bn_batch_stats"])))
