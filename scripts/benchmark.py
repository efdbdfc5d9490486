#!/usr/bin/env python
"""Training throughput of blockft_jax against Keras 3 (TensorFlow and JAX backends).

  python scripts/benchmark.py --model mobilenet_v2 --trainable block_16 --batch 32 --size 224 \
      --images 192 --epochs 5 --frameworks blockft_jax,keras_tf,keras_jax [--no-cache] [--width 1.0]
  python scripts/benchmark.py --all ...    # every row of ROWS, every framework, markdown table
  python scripts/benchmark.py --input-check --mock-data --no-cache ...   # input pipeline check
  python scripts/benchmark.py --search [--keras-runs N]   # the demo search: default vs one at a time vs Keras
  python scripts/benchmark.py --checkpoints   # the demo search's checkpoint cost; checkpoint sizes
  python scripts/benchmark.py --halving [--tasks demo,swapped]   # whole network: exhaustive vs halving
  python scripts/benchmark.py --recipes [--tasks demo,swapped]   # the winner vs the best fixed recipe
  python scripts/benchmark.py --determinism   # the demo twice, once under load: the same rows?
  python scripts/benchmark.py --against 3266442   # the demo at a commit, then here: the ratio
  python scripts/benchmark.py --compile-programs head,block_16,block_8,all --runs 6  # compile s

The same fine-tuning job runs in each framework: `--images` random uint8 images (fixed seed)
with 5 random labels, a `keras.applications` backbone (`weights=None`) + global average pooling +
a Dense(5) head, Adam, sparse categorical cross-entropy from logits. `--trainable` picks the
trained set: `head` (the new classifier only), `all` (every layer), or a Keras layer-name prefix
(every Keras layer whose name starts with it, plus the head). Frozen BatchNorm runs in inference
mode, trained BatchNorm uses batch statistics (Keras's rule); blockft_jax trains exactly the
layers Keras trains (checked: both workers report their trained layers and parameter counts).

Each framework runs in its own subprocess, one after the other (Keras's backend is fixed per
process): KERAS_BACKEND=tensorflow for keras_tf, =jax for keras_jax. Each does a warm-up first
(reported as compile seconds; it includes one epoch of training), then times `--epochs` epochs:
images/s = epochs x images / wall seconds.

  keras_*      model.fit(x, y, batch_size, epochs=1) to warm up, then model.fit(..., epochs=E)
               timed. Images are preprocessed (Keras's preprocess_input mode) on the host
               beforehand, outside the timed region; fit gets float32 arrays.
  blockft_jax  one run (a cohort of one, `cohort.Cohort(engine, 1)`) of a train.Engine from
               the lowest unit holding a trained layer, set up by blockft_jax.benchmarking (as
               scripts/gpu_check.py's). Default (the fine-tuning level): with a frozen prefix
               below that unit, the engine caches the prefix's output (cached=True), where the
               search would keep it (device memory when `placement.cache_on_device` says so, or
               as `--cache-in` says), and the timed region *includes* computing those features
               (engine.features) once, since users wait for it. `--no-cache` (the step level):
               cached=False, every step runs the frozen prefix too. The loop is the search's
               without validation: cohort.train_epoch (each epoch shuffled; a device-resident
               cache's batches gathered on the device, others fed from the host), metrics
               fetched once per epoch. uint8 images go to the device and are preprocessed
               inside the step.
  blockft_jax_step  blockft_jax with --no-cache: both levels side by side in one command.

`--input-check` (blockft_jax only) times the input pipeline -- tf_flowers through
data.load_dataset, then the per-step host work of cohort.train_epoch -- against synthetic
batches placed on the device once (cohort.feed), with the same run and epochs interleaved.

Per framework it reports images/s, warm-up (compile) seconds, peak resident memory
(ru_maxrss of the subprocess) and the ratios blockft_jax/keras_tf and blockft_jax/keras_jax.
The output of a single row ends with one line per framework: `<framework> images_per_s=<x>`
(`nan` where that framework failed; its error is printed above).

`--search` times whole searches instead: the offline demo (`configs/demo.py`, the command the
README gives) with `--config.search.parallel=1` on one device (one run at a time) and with the
default (cohorts where the placement rule finds they pay, measured per engine on a CPU, and
there one device per physical core), each
in a fresh workdir with an empty JAX compilation cache (its own `JAX_COMPILATION_CACHE_DIR`),
then each again with that cache filled; and the same runs as a hand-written Keras loop
(`scripts/keras_search_loop.py`, Keras on TensorFlow: per run set `trainable`, compile, fit
with validation). The demo backbone is pretrained (or read from its
cache) before any timing. Per search: wall seconds of the command, and its training seconds
(the fits, from `runs.jsonl`); ratios against one at a time and against the Keras loop.
`--keras-runs N` times only the first N Keras runs and extrapolates (labelled as such).

`--halving` runs, per task, the whole-network search (search.max_*=0) of `--search-config`
with search.schedule='exhaustive' and 'halving', each from an empty compilation cache (the demo
backbone pretrained before, untimed): wall and training seconds, runs and run-epochs (from
results.jsonl, pruned runs included), each strategy's selected candidate, and the paired
difference (the project's paired bootstrap) between the two winners on validation and test.
Tasks: `demo` (digits 5-9 from a backbone pretrained on 0-4) and `swapped` (0-4 from 5-9).
`--scratch DIR` keeps the searches there: a rerun after an interruption skips those already
timed (`<task>/<schedule>.json`).

`--checkpoints` times the same search (`--search-config`) with a checkpoint after every epoch
(`train.checkpoint_seconds=0`), at the default spacing and with none, one after the other with
one filled compilation cache, and prints the cost of each against none; then the bytes one
checkpoint of a cohort of 8 writes for the demo, MobileNetV2 and VGG16 at 224 px (from shapes).
"""
from __future__ import annotations

import argparse
import builtins
import functools
import json
import math
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's package (installed or not) and its configs/
from blockft_jax import benchmarking as bench  # noqa: E402
from blockft_jax.common import cores  # noqa: E402
from blockft_jax.common.workdir import read_results  # noqa: E402

# blockft_jax_step: blockft_jax at the step level (no prefix cache), as --no-cache makes it.
FRAMEWORKS = ("blockft_jax", "blockft_jax_step", "keras_tf", "keras_jax")
KERAS_BACKEND = {"keras_tf": "tensorflow", "keras_jax": "jax"}
OURS = ("blockft_jax", "blockft_jax_step")
ROWS = (("mobilenet_v2", "block_16"), ("mobilenet_v2", "all"), ("mobilenet_v2", "head"),
        ("mobilenet_v1", "conv_pw_13"), ("mobilenet_v3_large", "expanded_conv_14"),
        ("resnet50_v2", "conv5_block3"), ("vgg16", "block5"))
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


# --- keras worker -----------------------------------------------------------------------------

def run_keras(args) -> dict:
    import numpy as np
    import keras

    from blockft_jax import models

    images, labels = bench.synthetic_data(args.images, args.size, args.seed)
    mode = models.model_class(args.model).preprocessing
    x = images.astype(np.float32)
    if mode == "tf":
        x = x / 127.5 - 1.0
    elif mode == "caffe":
        x = x[..., ::-1] - np.asarray(_CAFFE_MEAN_BGR, np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = labels

    keras.utils.set_random_seed(args.seed)
    entry = models.REGISTRY[args.model]
    has_width, constructor = entry.has_width, entry.keras_name
    kwargs = dict(include_top=False, weights=None, input_shape=(args.size, args.size, 3))
    if has_width:
        kwargs["alpha"] = args.width
    base = getattr(keras.applications, constructor)(**kwargs)
    features = keras.layers.GlobalAveragePooling2D(name="benchmark_avg_pool")(base.output)
    logits = keras.layers.Dense(bench.NUM_CLASSES, name="benchmark_head")(features)
    model = keras.Model(base.inputs, logits)
    head = {"benchmark_avg_pool", "benchmark_head"}
    for layer in model.layers:
        layer.trainable = layer.name in head or bench.in_trained_set(layer.name, args.trainable)
    trained = [l.name for l in model.layers
               if l.trainable and l.weights and l.name not in head]
    if args.trainable not in ("head", "all") and not trained:
        raise ValueError(f"No weighted layer of {args.model} starts with {args.trainable!r}.")
    batch_stat_bn = [l.name for l in model.layers
                     if isinstance(l, keras.layers.BatchNormalization) and l.trainable]
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    started = time.perf_counter()
    model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
    compile_s = time.perf_counter() - started
    started = time.perf_counter()
    model.fit(x, y, batch_size=args.batch, epochs=args.epochs, verbose=0)
    wall = time.perf_counter() - started

    versions = {"keras": keras.__version__, "backend": keras.backend.backend()}
    if versions["backend"] == "tensorflow":
        import tensorflow as tf
        versions["tensorflow"] = tf.__version__
    elif versions["backend"] == "jax":
        import jax
        versions["jax"] = jax.__version__
    return {"images_per_s": args.epochs * args.images / wall, "compile_s": compile_s,
            "timed_s": wall, "trained_layers": trained, "batch_stat_bn": batch_stat_bn,
            "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
            "versions": versions}


# --- blockft_jax worker -----------------------------------------------------------------------

def blockft_job(args) -> bench.Job:
    return bench.setup(args.model, args.trainable, size=args.size, width=args.width,
                       seed=args.seed, cache=not args.no_cache)


def run_blockft(args) -> dict:
    import jax

    from blockft_jax.inputs import data
    from blockft_jax.engine import placement

    split = data.Split(*bench.synthetic_data(args.images, args.size, args.seed))
    job = blockft_job(args)
    engine = job.engine

    # Warm-up: compiles the cohort's init, the prefix (when cached) and the train step.
    started = time.perf_counter()
    runs = job.start(args.runs)  # --runs 1: one run, a cohort of one
    jax.block_until_ready(runs.state)
    parts = {"init": time.perf_counter() - started}
    on_device = job.cached and (args.cache_in == "device" or args.cache_in == "auto" and
                                placement.cache_on_device(engine.feature_bytes(len(split)),
                                                          engine.mesh,
                                                          placement.free_memory(engine.mesh)))

    def cache():  # the prefix cache, where the search would keep it (or --cache-in says)
        features = engine.features(job.variables, split, args.batch)
        return engine.to_device(features) if on_device else features

    inputs = cache() if job.cached else split
    parts["features"] = time.perf_counter() - started - parts["init"]
    runs.epoch(inputs, args.batch, 0)
    jax.block_until_ready(runs.state)
    compile_s = time.perf_counter() - started
    parts["epoch"] = compile_s - parts["init"] - parts["features"]

    # Timed: (prefix features, when cached) + E epochs, as the search trains them (without
    # validation): cohort.train_epoch, metrics fetched once per epoch.
    started = time.perf_counter()
    features_s = 0.0
    if job.cached:
        inputs = jax.block_until_ready(cache())
        features_s = time.perf_counter() - started
    losses = [runs.epoch(inputs, args.batch, epoch)[0] for epoch in range(1, args.epochs + 1)]
    jax.block_until_ready(runs.state)
    wall = time.perf_counter() - started

    # With --runs K, every run trains on every image: K x the images (per run: / K).
    return {"images_per_s": args.runs * args.epochs * args.images / wall,
            "compile_s": compile_s, "runs": args.runs,
            "timed_s": wall, "features_s": features_s, "cached": job.cached,
            "cache_in": ("device" if on_device else "host") if job.cached else None,
            "warmup_parts": parts,
            "level": "fine-tuning (prefix cache)" if job.cached else "step",
            "from_unit": job.from_unit, "units": job.units,
            "compilations": runs.compilations, "losses": losses,
            "trained_layers": list(job.layers), "batch_stat_bn": job.batch_stat_bn,
            "trainable_params": job.trainable_params,
            "versions": {"jax": jax.__version__, "device": str(jax.devices()[0]),
                         "device_count": jax.device_count()}}


def pipeline_data(args):
    """`--images` training images of tf_flowers through blockft_jax's input pipeline
    (data.load_dataset: TFDS, decode, resize, carve, cache), and the seconds that took."""
    import tempfile

    from blockft_jax.inputs import data

    def load(data_dir):
        started = time.perf_counter()
        dataset = data.load_dataset("tf_flowers", image_size=args.size, data_dir=data_dir)
        train = dataset.train
        if len(train.labels) < args.images:
            raise ValueError(f"tf_flowers' train split has {len(train.labels)} images; "
                             f"--images {args.images} asks for more.")
        return data.Split(train.images[:args.images],
                          train.labels[:args.images] % bench.NUM_CLASSES), \
            time.perf_counter() - started

    if not args.mock_data:
        return load(None)
    import tensorflow_datasets as tfds
    with tempfile.TemporaryDirectory() as tmp, \
            tfds.testing.mock_data(num_examples=math.ceil(args.images / 0.7) + 10):
        return load(tmp)


def run_input_check(args) -> dict:
    """One run (a cohort of one), two inputs, epochs interleaved: (a) the input pipeline --
    tf_flowers images loaded by data.load_dataset, then cohort.train_epoch's per-step host work
    (shuffle, gather, feed); (b) synthetic batches placed on the device once and reused. The
    steps and the metrics fetch are the same; only the input differs."""
    import jax

    from blockft_jax.inputs import data

    job = blockft_job(args)
    engine = job.engine
    split, load_s = pipeline_data(args)
    synthetic = data.Split(*bench.synthetic_data(args.images, args.size, args.seed))
    if job.cached:
        split = engine.features(job.variables, split, args.batch)
        synthetic = engine.features(job.variables, synthetic, args.batch)
    runs = job.start(1)
    resident = [runs.feed(b.images[None], b.labels[None], b.mask[None])
                for b in data.batches(synthetic, args.batch, shuffle_rng=None)]

    def device_epoch():  # cohort.train_epoch's loop, minus the input pipeline
        jax.device_get([runs.step(fed) for fed in resident])

    def pipeline_epoch(epoch):
        runs.epoch(split, args.batch, epoch)

    pipeline_epoch(0)  # warm-up
    device_epoch()
    jax.block_until_ready(runs.state)
    seconds = {"pipeline": 0.0, "device_resident": 0.0}
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        pipeline_epoch(epoch)
        jax.block_until_ready(runs.state)
        seconds["pipeline"] += time.perf_counter() - started
        started = time.perf_counter()
        device_epoch()
        jax.block_until_ready(runs.state)
        seconds["device_resident"] += time.perf_counter() - started
    rates = {k: args.epochs * args.images / v for k, v in seconds.items()}
    return {"images_per_s": rates["pipeline"], "device_resident_images_per_s":
            rates["device_resident"], "pipeline_ratio": rates["pipeline"] / rates["device_resident"],
            "load_s": load_s, "mock_data": args.mock_data, "cached": job.cached,
            "from_unit": job.from_unit, "compilations": runs.compilations}


def worker(args):
    if args.input_check:
        bench.report(lambda: run_input_check(args))
    elif args.worker == "blockft_jax":
        bench.report(lambda: run_blockft(args))
    else:
        bench.report(lambda: run_keras(args))


# --- parent -----------------------------------------------------------------------------------

def launch(framework: str, model: str, trainable: str, args) -> dict:
    """Runs one framework in its own subprocess; never raises."""
    no_cache = args.no_cache or framework == "blockft_jax_step"
    worker = "blockft_jax" if framework == "blockft_jax_step" else framework
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker,
           "--model", model, "--trainable", trainable, "--batch", str(args.batch),
           "--size", str(args.size), "--images", str(args.images), "--epochs", str(args.epochs),
           "--width", str(args.width), "--seed", str(args.seed), "--cache-in", args.cache_in,
           "--runs", str(args.runs)]
    if no_cache:
        cmd.append("--no-cache")
    if args.input_check:
        cmd.append("--input-check")
    if args.mock_data:
        cmd.append("--mock-data")
    print(f"[{model} {trainable}] running {framework} ...", file=sys.stderr, flush=True)
    return bench.launch(cmd, env=bench.worker_env(KERAS_BACKEND=KERAS_BACKEND.get(framework)),
                        timeout=args.worker_timeout)


def ratio(results, a, b) -> float:
    ra, rb = results.get(a, {}), results.get(b, {})
    if ra.get("ok") and rb.get("ok") and rb["images_per_s"] > 0:
        return ra["images_per_s"] / rb["images_per_s"]
    return float("nan")


def parity_notes(results) -> list[str]:
    """Does blockft_jax train exactly the layers (and parameter count) Keras trains?"""
    ours = next((results[fw] for fw in OURS if results.get(fw, {}).get("ok")), {})
    if not ours.get("ok"):
        return []
    notes = []
    for fw in ("keras_tf", "keras_jax"):
        theirs = results.get(fw, {})
        if not theirs.get("ok"):
            continue
        a, b = set(ours["trained_layers"]), set(theirs["trained_layers"])
        if a != b:
            notes.append(f"WARNING trained set differs from {fw}: only blockft_jax "
                         f"{sorted(a - b)[:6]}, only {fw} {sorted(b - a)[:6]}")
        elif set(ours["batch_stat_bn"]) != set(theirs["batch_stat_bn"]):
            notes.append(f"WARNING batch-statistics BN layers differ from {fw}")
        elif ours["trainable_params"] != theirs["trainable_params"]:
            notes.append(f"WARNING trainable parameters: blockft_jax "
                         f"{ours['trainable_params']:,} vs {fw} {theirs['trainable_params']:,}")
        else:
            notes.append(f"trained set matches {fw}: {len(a)} weighted backbone layers + head, "
                         f"{len(ours['batch_stat_bn'])} BN with batch statistics, "
                         f"{ours['trainable_params']:,} trainable parameters")
    return notes


def _fmt(value, spec=".2f"):
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def run_row(model, trainable, args, frameworks) -> dict:
    results = {}
    for fw in frameworks:
        if fw == "blockft_jax_step" and results.get("blockft_jax", {}).get("cached") is False:
            results[fw] = results["blockft_jax"]  # no frozen prefix: the same run
        else:
            results[fw] = launch(fw, model, trainable, args)
    return results


def print_row(model, trainable, args, frameworks, results, file=None):
    print = functools.partial(builtins.print, file=file or sys.stdout)
    print(f"## {model}, trainable={trainable}  (batch {args.batch}, {args.size}px, "
          f"{args.images} images, {args.epochs} epochs, width {args.width}"
          f"{', --no-cache' if args.no_cache else ''})")
    print()
    print("| framework | images/s | compile (warm-up) s | timed s | peak RSS MB | notes |")
    print("|---|---:|---:|---:|---:|---|")
    for fw in frameworks:
        r = results[fw]
        if r.get("ok"):
            note = ""
            if fw in OURS:
                note = (f"{r['level']}, from_unit={r['from_unit']}, {r['runs']} run(s) "
                        f"vmapped ({r['images_per_s'] / r['runs']:.2f} images/s per run), "
                        f"compilations={r['compilations']}")
                if r["cached"]:
                    note += (f", cache in {r['cache_in']} memory, features "
                             f"{r['features_s']:.2f} s (timed)")
                note += ", warm-up: " + ", ".join(f"{k} {v:.1f} s"
                                                  for k, v in r["warmup_parts"].items())
            else:
                note = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
            print(f"| {fw} | {r['images_per_s']:.2f} | {r['compile_s']:.1f} | "
                  f"{r['timed_s']:.1f} | {r['peak_rss_mb']:.0f} | {note} |")
        else:
            print(f"| {fw} | failed | | | | {r.get('error')} |")
    print()
    for fw in frameworks:
        r = results[fw]
        if not r.get("ok"):
            print(f"{fw} FAILED: {r.get('error')}")
            if r.get("log"):
                print("  " + "\n  ".join(r["log"].strip().splitlines()[-15:]))
    for ours in OURS:
        for other in KERAS_BACKEND:
            if ours in frameworks and other in frameworks:
                print(f"ratio {ours}/{other} = {_fmt(ratio(results, ours, other))}")
    for note in parity_notes(results):
        print(note)
    for fw in OURS:
        ours = results.get(fw, {})
        if ours.get("ok") and ours["compilations"].get("train", 0) > 1:
            print(f"WARNING {fw} compiled its train step {ours['compilations']['train']} "
                  "times (expected once)")
    print()


def print_all_table(args, frameworks, table):
    print(f"# blockft_jax vs Keras 3: batch {args.batch}, {args.size}px, {args.images} images, "
          f"{args.epochs} epochs, width {args.width}")
    print()
    ratios = [(a, b) for a in OURS for b in KERAS_BACKEND if a in frameworks and b in frameworks]
    head = ["model", "trainable", "from unit"]
    head += [f"{fw} img/s" for fw in frameworks]
    head += [f"{a}/{b}" for a, b in ratios]
    head += [f"{fw} compile s" for fw in frameworks]
    head += [f"{fw} peak MB" for fw in frameworks]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * 3 + "---:|" * (len(head) - 3))
    failures, warnings = [], []
    for (model, trainable), results in table:
        ours = next((results[fw] for fw in OURS if results.get(fw, {}).get("ok")), {})
        cells = [model, trainable, ours.get("from_unit", "")]
        get = lambda fw, k, spec: _fmt(results[fw].get(k) if results[fw].get("ok") else None, spec)
        cells += [get(fw, "images_per_s", ".2f") for fw in frameworks]
        cells += [f"**{_fmt(ratio(results, a, b))}**" for a, b in ratios]
        cells += [get(fw, "compile_s", ".1f") for fw in frameworks]
        cells += [get(fw, "peak_rss_mb", ".0f") for fw in frameworks]
        print("| " + " | ".join(cells) + " |")
        failures += [f"{model}/{trainable}/{fw}: {r.get('error')}"
                     for fw, r in results.items() if not r.get("ok")]
        warnings += [f"{model}/{trainable}: {n}" for n in parity_notes(results)
                     if n.startswith("WARNING")]
    print()
    print("images/s = epochs x images / wall seconds of the timed epochs, after a warm-up run "
          "(compile s: the warm-up, which includes one epoch). Each framework ran in its own "
          "process, one after another; peak MB is that process's ru_maxrss. blockft_jax: the "
          "fine-tuning level (prefix cache; its timed region includes computing the cached "
          "features); blockft_jax_step: the step level (no cache; the frozen units below the "
          "lowest trained unit run in every step). Where nothing is frozen below the trained "
          "layers (`all`) both levels are the same run. "
          + ("Failures: " + "; ".join(failures) + ". " if failures else "")
          + ("Parity warnings: " + "; ".join(warnings) + "." if warnings
             else "Trained sets matched Keras's in every row where both ran."))


# --- whole searches --------------------------------------------------------------------------


def timed_search(args, workdir: str, cache: str, extra: list[str], root: str = ROOT,
                 env: dict | None = None) -> dict:
    """One `python -m blockft_jax.main` search in a subprocess (the package of the checkout
    at `root`; `env` on top of this process's environment): wall seconds, and the training
    seconds and compile figures its runs.jsonl records."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, **(env or {}))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "blockft_jax.main", "--config",
                           args.search_config, "--workdir", workdir, *args.search_override,
                           *extra], cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"search failed ({' '.join(extra)}):\n{done.stderr[-3000:]}")
    with open(os.path.join(workdir, "runs.jsonl")) as f:
        record = json.loads(f.read().splitlines()[-1])
    with open(os.path.join(workdir, "summary.json")) as f:
        winner = json.load(f)["winner"]
    return {"wall_s": wall, "training_s": record["training_seconds"],
            "compile_s": record["compile_seconds"],
            "compile_blocking_s": record["compile_blocking_seconds"],
            "winner": f"{winner['candidate']} {winner['val_accuracy']['mean']:.3f}"}


def warm_up(args, scratch: str) -> None:
    """The demo backbone, pretrained once and cached, before anything is timed."""
    # The search's overrides but those that would make the warm-up a search (the first of a
    # repeated override wins).
    overrides = [o for o in args.search_override if not o.startswith(
        ("--config.train.epochs", "--config.search.strategies"))]
    warm = subprocess.run([sys.executable, "-m", "blockft_jax.main", "--config",
                           args.search_config, "--workdir", os.path.join(scratch, "warm"),
                           *overrides, "--config.train.epochs=1",
                           "--config.search.strategies=('classifier_only',)"], cwd=ROOT,
                          capture_output=True, text=True)
    if warm.returncode != 0:
        raise SystemExit(f"warm-up failed:\n{warm.stderr[-3000:]}")


def determinism_benchmark(args) -> None:
    """The same command twice on one machine, the second beside a load that holds about 60%
    of the memory and keeps every core busy: the engines' split (from the speed kept per
    machine) and the cohorts (from the host's whole memory) do not move, so neither do the
    numbers. Exit status 1 when a row differs."""
    import tempfile

    scratch = args.scratch or tempfile.mkdtemp(prefix="blockft_determinism_")
    cache = os.path.join(scratch, "jax_cache")
    warm_up(args, scratch)
    quiet = timed_search(args, os.path.join(scratch, "quiet"), cache, [])
    load = subprocess.Popen([sys.executable, "-c", LOAD, str(os.cpu_count() or 1)],
                            start_new_session=True)  # its spinners die with its group
    try:
        time.sleep(5)  # the memory held, the cores busy
        loaded = timed_search(args, os.path.join(scratch, "loaded"), cache, [])
    finally:
        os.killpg(load.pid, signal.SIGKILL)
        load.wait()
    rows = {name: [{k: v for k, v in row.items() if k != "train_seconds"}
                   for row in read_results(os.path.join(scratch, name))]
            for name in ("quiet", "loaded")}
    same = rows["quiet"] == rows["loaded"]
    print(f"quiet: {quiet['wall_s']:.0f} s, winner {quiet['winner']}; under load: "
          f"{loaded['wall_s']:.0f} s, winner {loaded['winner']}; {len(rows['quiet'])} and "
          f"{len(rows['loaded'])} rows: {'the same bitwise' if same else 'DIFFERENT'} (all but "
          f"train_seconds)")
    if not same:
        sys.exit(1)


def against_benchmark(args) -> None:
    """The search (--search-config) at commit --against and in this checkout, one after the
    other, each from an empty compilation cache (the demo backbone cached first): wall,
    training and compile seconds, the ratio, and how many result rows differ."""
    import tempfile

    scratch = args.scratch or tempfile.mkdtemp(prefix="blockft_against_")
    tree = os.path.join(scratch, "tree")
    made = subprocess.run(["git", "worktree", "add", "--detach", tree, args.against], cwd=ROOT,
                          capture_output=True, text=True)
    if made.returncode != 0:
        raise SystemExit(f"--against {args.against}: no checkout of it ({made.stderr.strip()})")
    try:
        warm_up(args, scratch)
        arms = {}
        for name, root in ((args.against, tree), ("this checkout", ROOT)):
            label = "before" if root == tree else "after"
            arms[name] = timed_search(args, os.path.join(scratch, label),
                                      os.path.join(scratch, f"cache-{label}"), [], root=root)
            print(f"{name}: {arms[name]}", file=sys.stderr, flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=ROOT,
                       capture_output=True)
    rows = {label: {(r["candidate"], r["seed"], r.get("rung")): r["val_accuracy"]
                    for r in read_results(os.path.join(scratch, label))}
            for label in ("before", "after")}
    moved = sum(rows["before"].get(key) != value for key, value in rows["after"].items())
    print(f"## The search of {args.search_config} {' '.join(args.search_override)}, "
          f"at {args.against} and in this checkout, each from an empty compilation cache\n")
    print("| code | wall s | training s | compile s (waited) | winner |")
    print("|---|---:|---:|---:|---|")
    for name, r in arms.items():
        print(f"| {name} | {r['wall_s']:.1f} | {r['training_s']:.1f} | {r['compile_s']:.1f} "
              f"({r['compile_blocking_s']:.1f}) | {r['winner']} |")
    before, after = arms[args.against], arms["this checkout"]
    print(f"\n{len(rows['after'])} rows ({len(rows['before'])} before), {moved} with another "
          f"validation accuracy or not there before")
    print(f"against_wall_ratio={before['wall_s'] / after['wall_s']:.2f}")
    print(f"against_training_ratio={before['training_s'] / after['training_s']:.2f}")


def compile_benchmark(args) -> None:
    """Each trained set's engine (--compile-programs) compiled as a search compiles it
    (`ahead.compile_steps`, for a cohort of --runs; train, validation and test splits of
    --images each, gathered on the device where the search would keep them there), nothing
    trained: the seconds of each kind of program, as runs.jsonl records them."""
    from blockft_jax import benchmarking as bench
    from blockft_jax.engine import ahead, placement
    from blockft_jax.engine import cohort as cohort_lib

    shape = (args.size, args.size, 3)
    print(f"## Programs compiled per engine: {args.model} (width {args.width}) at {args.size} "
          f"px, cohorts of {args.runs}, batch {args.batch}, splits of {args.images} images\n")
    print("| trained set | engine from | inputs | train s | eval s | state s | "
          "train MB (XLA's plan) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for trainable in [t.strip() for t in args.compile_programs.split(",") if t.strip()]:
        job = bench.setup(args.model, trainable, size=args.size, width=args.width,
                          seed=args.seed, cache=not args.no_cache)
        cohort = cohort_lib.Cohort(job.engine, args.runs)
        cache_bytes = placement.device_split_bytes(job.engine, 3 * args.images, shape)
        on_device = placement.first(job.engine, job.variables, args.runs, args.runs, cache_bytes,
                                    None)["cache_on_device"]  # the search's own decision
        sizes = dict.fromkeys(("train", "validation", "test"), args.images) if on_device \
            else None
        memory = ahead.compile_steps(cohort, job.variables, job.mask, job.bn_modes, args.batch,
                                     shape, sizes)
        took = cohort.compile_seconds
        inputs = ("prefix cache" if job.cached else "images") + \
            (", an epoch a program" if on_device else ", fed a step a call")
        print(f"| {trainable} | {job.from_unit} | {inputs} | {took['train']:.1f} | "
              f"{took['eval']:.1f} | {took['state']:.1f} | {memory['train'] / 2**20:.1f} |",
              flush=True)


# Holds ~60% of the memory available and keeps every core busy until killed.
LOAD = """
import multiprocessing, os, sys
def spin():
    while True:
        pass
available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
held = bytearray(int(0.6 * available))
held[::4096] = b"x" * len(held[::4096])  # touched: resident, not just reserved
for _ in range(int(sys.argv[1])):
    multiprocessing.Process(target=spin, daemon=True).start()
spin()
"""


def search_benchmark(args) -> None:
    import tempfile
    scratch = tempfile.mkdtemp(prefix="blockft_search_bench_")
    print(f"The searches' workdirs, kept for their logs and reports: {scratch}", file=sys.stderr,
          flush=True)
    warm_up(args, scratch)
    # One at a time: one run on one device (on a CPU the command's default is a device per
    # physical core, each training a run).
    settings = {"one at a time": (["--config.search.parallel=1"], {
                    "XLA_FLAGS": cores.with_device_count(os.environ.get("XLA_FLAGS", ""), 1)}),
                "default": ([], {})}
    rows = {}
    for cache_state in args.cache_states.split(","):
        for name, (extra, env) in settings.items():
            cache = os.path.join(scratch, f"cache-{len(extra)}")
            workdir = os.path.join(scratch, f"{cache_state}-{len(extra)}")
            rows[(name, cache_state)] = timed_search(args, workdir, cache, extra, env=env)
            print(f"{name}, {cache_state} compilation cache: {rows[(name, cache_state)]}",
                  file=sys.stderr, flush=True)
    keras_runs_s = keras_total = math.nan
    if not args.no_keras:
        keras = [sys.executable, os.path.join(ROOT, "scripts", "keras_search_loop.py"),
                 "--backend", "tensorflow", "--config", args.search_config] + (
                     [] if args.keras_runs is None else ["--runs", str(args.keras_runs)])
        started = time.perf_counter()
        done = subprocess.run(keras, cwd=ROOT, capture_output=True, text=True)
        keras_total = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"Keras loop failed:\n{done.stderr[-3000:]}")
        keras_runs_s = _keras_runs_seconds(done.stdout, extrapolated=args.keras_runs is not None)

    first = args.cache_states.split(",")[0]
    base = rows[("one at a time", first)]
    print(f"## The search of {args.search_config} {' '.join(args.search_override)}, "
          f"one command\n")
    print("| search | compilation cache | wall s | training s | compile s (waited) | winner |"
          " wall vs one at a time | training vs one at a time | vs Keras loop (runs) |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for (name, cache_state), r in rows.items():
        one = rows[("one at a time", cache_state)]
        print(f"| {name} | {cache_state} | {r['wall_s']:.1f} | {r['training_s']:.1f} | "
              f"{r['compile_s']:.1f} ({r['compile_blocking_s']:.1f}) | {r['winner']} | "
              f"{one['wall_s'] / r['wall_s']:.2f}x | {one['training_s'] / r['training_s']:.2f}x "
              f"| {keras_runs_s / r['wall_s']:.1f}x |")
    label = "EXTRAPOLATED from the first %d runs" % args.keras_runs if args.keras_runs else \
        "all runs"
    print(f"\nKeras loop (Keras on TensorFlow, {label}): {keras_runs_s:.1f} s of runs "
          f"({keras_total:.1f} s with its setup); the last column is that over the search's "
          f"whole wall time.")
    default = rows[("default", first)]  # the ratios: with the first cache state
    print(f"search_wall_ratio={base['wall_s'] / default['wall_s']:.2f}")
    print(f"search_training_ratio={base['training_s'] / default['training_s']:.2f}")
    print(f"keras_loop_ratio={keras_runs_s / default['wall_s']:.1f}")


# --- the whole network: exhaustive against successive halving ---------------------------------

WHOLE_NETWORK = ["--config.search.max_layers=0", "--config.search.max_blocks=0",
                 "--config.search.max_windows=0"]
# The demo's task, and one its settings were not tuned on: digits 0-4 from a backbone
# pretrained on 5-9.
HALVING_TASKS = {"demo": [],
                 "swapped": ["--config.data.classes=(0,1,2,3,4)",
                             "--config.demo.pretrain_classes=(5,6,7,8,9)"]}


def halving_benchmark(args) -> None:
    """Per task: the whole-network search of --search-config, exhaustive then halving, each
    from an empty compilation cache in a fresh workdir (the backbone pretrained before, untimed);
    wall and training seconds, runs and run-epochs, each strategy's selection, and the paired
    difference between the two winners (exhaustive minus halving) on validation and test."""
    import tempfile

    import numpy as np

    from blockft_jax.search import results
    from blockft_jax.common import statistics
    scratch = args.scratch or tempfile.mkdtemp(prefix="blockft_halving_bench_")
    base_overrides = list(args.search_override)
    tables = []
    for task in args.tasks.split(","):
        args.search_override = base_overrides + HALVING_TASKS[task] + WHOLE_NETWORK
        searched = {}
        for schedule in ("exhaustive", "halving"):
            workdir = os.path.join(scratch, task, schedule)
            # A search timed before (--scratch of an interrupted benchmark) is not run again.
            timed = os.path.join(scratch, task, f"{schedule}.json")
            if os.path.exists(timed):
                with open(timed) as f:
                    timing = json.load(f)
            else:
                if not os.path.exists(os.path.join(scratch, task, "warm")):
                    warm_up(args, os.path.join(scratch, task))
                timing = timed_search(args, workdir,
                                      os.path.join(scratch, task, f"cache-{schedule}"),
                                      [f"--config.search.schedule={schedule}"])
                with open(timed, "w") as f:
                    json.dump(timing, f)
            searched[schedule] = {**timing, **_search_outcome(workdir)}
            print(f"{task}, {schedule}: {searched[schedule]}", file=sys.stderr, flush=True)
        exhaustive, halving = searched["exhaustive"], searched["halving"]
        paired = {}
        for split in ("validation", "test"):
            correct = [results.load_correct(os.path.join(r["workdir"], results.PREDICTIONS_DIR),
                                            r["winner_candidate"], r["seeds"], split)
                       for r in (exhaustive, halving)]
            difference = float(np.mean(correct[0]) - np.mean(correct[1]))
            paired[split] = (difference, statistics.interval95(statistics.paired_bootstrap(*correct)))
        tables.append((task, searched, paired))

    print(f"## Whole network: exhaustive against halving, {args.search_config} "
          f"{' '.join(base_overrides)}, one command\n")
    print("| task | schedule | wall s | training s | runs | run-epochs | winner (val) | "
          "wall vs exhaustive | run-epochs vs exhaustive |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    for task, searched, _ in tables:
        e = searched["exhaustive"]
        for schedule, r in searched.items():
            print(f"| {task} | {schedule} | {r['wall_s']:.0f} | {r['training_s']:.0f} | "
                  f"{r['runs']} | {r['run_epochs']:,} | {r['winner']} | "
                  f"{e['wall_s'] / r['wall_s']:.1f}x | {e['run_epochs'] / r['run_epochs']:.1f}x |")
    print("\n| task | strategy | exhaustive selects | halving selects |")
    print("|---|---|---|---|")
    for task, searched, _ in tables:
        for strategy, chosen in searched["exhaustive"]["selected"].items():
            print(f"| {task} | {strategy} | {chosen} | "
                  f"{searched['halving']['selected'].get(strategy, '-')} |")
    print("\n| task | exhaustive winner - halving winner, validation [95%] | test [95%] |")
    print("|---|---|---|")
    for task, _, paired in tables:
        print(f"| {task} | " + " | ".join(
            f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, (lo, hi) in paired.values()) + " |")
    print(f"\nPaired: {results.METHOD.format(statistics.REPLICATES)}; over the seeds both winners "
          f"trained.")
    for task, searched, paired in tables:
        e, h = searched["exhaustive"], searched["halving"]
        lo, hi = paired["validation"][1]
        print(f"{task}_wall_ratio={e['wall_s'] / h['wall_s']:.1f}")
        print(f"{task}_halving_not_worse={'yes' if lo <= 0 else 'no'} "
              f"(validation interval [{lo:+.3f}, {hi:+.3f}])")


# --- the search's winner against the best fixed recipe ---------------------------------------

# The fixed recipes: classifier-only and full fine-tuning, each under every setting the search
# has, every seed to the end (the paper's protocol), the best chosen on validation.
RECIPES = ["--config.search.strategies=('classifier_only', 'full')",
           "--config.search.schedule=exhaustive"]


def recipe_benchmark(args) -> None:
    """Per task: the search of --search-config as it ships, and the fixed recipes (RECIPES);
    the best recipe (by validation) minus the search's winner, paired, on validation and test.
    The target: on test (validation chose both, so compare where no choice was made) the recipe
    is not distinguishably better than the winner (its interval includes 0 or lies below)."""
    import tempfile

    import numpy as np

    from blockft_jax.search import results
    from blockft_jax.common import statistics
    scratch = args.scratch or tempfile.mkdtemp(prefix="blockft_recipe_bench_")
    base_overrides = list(args.search_override)
    rows = []
    for task in args.tasks.split(","):
        args.search_override = base_overrides + HALVING_TASKS[task]
        outcome = {}
        for name, extra in (("search", []), ("recipes", RECIPES)):
            workdir = os.path.join(scratch, task, name)
            timed = os.path.join(scratch, task, f"{name}.json")
            if os.path.exists(timed):
                with open(timed) as f:
                    timing = json.load(f)
            else:
                if not os.path.exists(os.path.join(scratch, task, "warm")):
                    warm_up(args, os.path.join(scratch, task))
                timing = timed_search(args, workdir, os.path.join(scratch, task, f"cache-{name}"),
                                      extra)
                with open(timed, "w") as f:
                    json.dump(timing, f)
            outcome[name] = {**timing, **_search_outcome(workdir)}
            print(f"{task}, {name}: {outcome[name]}", file=sys.stderr, flush=True)
        paired = {}
        for split in ("validation", "test"):
            correct = [results.load_correct(os.path.join(r["workdir"], results.PREDICTIONS_DIR),
                                            r["winner_candidate"], r["seeds"], split)
                       for r in (outcome["recipes"], outcome["search"])]
            paired[split] = (float(np.mean(correct[0]) - np.mean(correct[1])),
                             statistics.interval95(statistics.paired_bootstrap(*correct)))
        rows.append((task, outcome, paired))

    print(f"## The search's winner against the best fixed recipe, {args.search_config} "
          f"{' '.join(base_overrides)}, one command\n")
    print("| task | search winner (val, test) | best recipe (val, test) | search wall s | "
          "recipe - winner, validation [95%] | recipe - winner, test [95%] |")
    print("|---|---|---|---:|---|---|")
    for task, o, paired in rows:
        print(f"| {task} | {o['search']['winner_line']} | {o['recipes']['winner_line']} | "
              f"{o['search']['wall_s']:.0f} | " + " | ".join(
                  f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, (lo, hi) in paired.values()) + " |")
    print(f"\nPaired: {results.METHOD.format(statistics.REPLICATES)}; over the seeds both trained.")
    print("\nEvery strategy of the search (its selected candidate, mean ± std over seeds; what "
          "its candidates trained, of the search's wall above):\n")
    print("| task | strategy | selected | validation | test | runs | run-epochs |")
    print("|---|---|---|---|---|---:|---:|")
    pm = lambda stat: f"{stat['mean']:.3f} ± {stat['std']:.3f}"
    for task, o, _ in rows:
        for name, s in o["search"]["strategies"].items():
            print(f"| {task} | {name} | `{s['selected']}` | {pm(s['val'])} | {pm(s['test'])} | "
                  f"{s['runs']} | {s['run_epochs']:,} |")
    for task, o, paired in rows:
        lo, hi = paired["test"][1]
        print(f"{task}_winner_not_worse_than_recipe={'yes' if lo <= 0 else 'no'} "
              f"(test interval [{lo:+.3f}, {hi:+.3f}])")


def _search_outcome(workdir: str) -> dict:
    """What a finished search chose and what it trained, from its files."""
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    rows = read_results(workdir)
    winner = summary["winner"]
    seeds = sorted(r["seed"] for r in rows if r["candidate"] == winner["candidate"])
    return {"workdir": workdir, "runs": len(rows), "run_epochs": sum(r["epochs"] for r in rows),
            "winner_candidate": winner["candidate"], "seeds": seeds,
            "winner_line": f"`{winner['candidate']}` {winner['val_accuracy']['mean']:.3f}, "
                           f"{winner['test_accuracy']['mean']:.3f}",
            "selected": {name: f"{s['selected']['candidate']} "
                               f"{s['selected']['val_accuracy']['mean']:.3f}"
                         for name, s in summary["strategies"].items()},
            # Per strategy: its selected candidate's accuracies over the seeds, and what all
            # its candidates trained (a strategy's wall is not separable: cohorts mix them).
            "strategies": {name: {
                "selected": s["selected"]["candidate"],
                "val": s["selected"]["val_accuracy"], "test": s["selected"]["test_accuracy"],
                "runs": sum(r["strategy"] == name for r in rows),
                "run_epochs": sum(r["epochs"] for r in rows if r["strategy"] == name)}
                for name, s in summary["strategies"].items()}}


# --- checkpoints -----------------------------------------------------------------------------

# (config file, overrides) whose cohort checkpoints are sized: the demo, and two models at 224 px.
CHECKPOINT_MODELS = (("configs/demo.py", {}), ("configs/mobilenet_v2.py", {}),
                     ("configs/vgg16.py", {}))
CHECKPOINT_SPACINGS = (("none", 1e9), ("default", None), ("every epoch", 0.0))


def checkpoint_bytes_table(cohort_size: int) -> list[str]:
    """Bytes one checkpoint of a cohort of `cohort_size` runs writes, per engine of each
    CHECKPOINT_MODELS search (from shapes: nothing is trained), against the layout that stored
    the frozen variables once and each run's best variables whole."""
    import importlib

    from blockft_jax.engine import checkpoint, train
    from blockft_jax import models
    from blockft_jax.search import plan
    from blockft_jax.engine import cohort as cohort_lib

    nbytes = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize
                              for x in __import__("jax").tree.leaves(tree))
    lines = [f"| search | engine (runs from unit) | live layers | checkpoint of {cohort_size} runs |"
             f" before (frozen once + best whole) |", "|---|---|---:|---:|---:|"]
    for path, overrides in CHECKPOINT_MODELS:
        config = importlib.import_module(path[:-3].replace("/", ".")).get_config()
        module = plan.build_module(config, num_classes=5)
        shape = (config.model.input_size,) * 2 + (3,)
        table = models.layer_table(module, shape)
        variables = models.variable_shapes(module, shape)
        search_plan = plan.make_plan(config, table, module)  # one engine for all but full
        tx = train.make_optimizer(config.train, 100)
        for unit in sorted(search_plan.from_units, key=lambda u: u == search_plan.first_unit):
            engine = train.Engine(module, tx, unit, train.data_mesh(), table=table)
            cohort = cohort_lib.Cohort(engine, cohort_size)
            now = checkpoint.checkpoint_bytes(cohort, variables)
            before = (nbytes(cohort.abstract_runs(variables)) +
                      nbytes(cohort.shared_part(variables)) + cohort_size * nbytes(variables))
            who = "full" if unit == search_plan.first_unit else "every candidate but full"
            lines.append(f"| {path} ({config.model.name}, {config.model.input_size} px) | "
                         f"{who} ({unit}) | {len(engine.live)} | {now / 2**20:,.1f} MB | "
                         f"{before / 2**20:,.1f} MB |")
    return lines


def checkpoint_benchmark(args) -> None:
    """The search of --search-config with a checkpoint after every epoch, at the default
    spacing and never, one after the other with the same (filled) compilation cache; then the
    bytes a checkpoint writes."""
    import tempfile
    scratch = tempfile.mkdtemp(prefix="blockft_checkpoint_bench_")
    warm_up(args, scratch)
    cache = os.path.join(scratch, "cache")
    timed_search(args, os.path.join(scratch, "fill-cache"), cache, [])  # compiles, untimed
    rows = {}
    for name, seconds in CHECKPOINT_SPACINGS:
        extra = [] if seconds is None else [f"--config.train.checkpoint_seconds={seconds}"]
        rows[name] = timed_search(args, os.path.join(scratch, name.replace(" ", "-")), cache,
                                  extra)
        print(f"checkpoints {name}: {rows[name]}", file=sys.stderr, flush=True)
    none = rows["none"]
    print(f"## Checkpoints: the search of {args.search_config} {' '.join(args.search_override)}"
          f", one command, filled compilation cache\n")
    print("| checkpoints | wall s | training s | cost vs none (wall) | winner |")
    print("|---|---:|---:|---:|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_s']:.1f} | {r['training_s']:.1f} | "
              f"{100 * (r['wall_s'] / none['wall_s'] - 1):+.1f}% | {r['winner']} |")
    print()
    print("\n".join(checkpoint_bytes_table(8)))
    for name, r in rows.items():
        print(f"checkpoint_cost_{name.replace(' ', '_')}="
              f"{100 * (r['wall_s'] / none['wall_s'] - 1):.1f}%")


def _keras_runs_seconds(stdout: str, extrapolated: bool) -> float:
    """The Keras loop's run seconds from its output (the extrapolated total with --runs)."""
    import re
    key = "EXTRAPOLATED" if extrapolated else "Keras loop ("
    line = next(l for l in stdout.splitlines() if l.startswith(key))
    return float(re.search(r"([0-9.]+) s", line.split(":", 1)[1]).group(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--trainable", default="block_16",
                        help="'head', 'all' or a Keras layer-name prefix (e.g. block_16)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--width", type=float, default=1.0, help="Keras's alpha (MobileNets)")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--no-cache", action="store_true",
                        help="blockft_jax at the step level: no prefix cache")
    parser.add_argument("--cache-in", choices=("auto", "host", "device"), default="auto",
                        help="where blockft_jax keeps the prefix cache: auto (as the search "
                             "does: device memory when it fits), host (batches fed from host "
                             "memory) or device (batches gathered on the device)")
    parser.add_argument("--all", action="store_true",
                        help="run every row of ROWS (by default with every framework: both "
                             "blockft_jax levels, Keras on TensorFlow and on JAX)")
    parser.add_argument("--input-check", action="store_true",
                        help="blockft_jax only: its input pipeline (tf_flowers through "
                             "data.load_dataset; TFDS mock data with --mock-data) against "
                             "synthetic batches already on the device, same engine, epochs "
                             "interleaved")
    parser.add_argument("--mock-data", action="store_true",
                        help="with --input-check: tfds.testing.mock_data stands in for "
                             "tf_flowers (offline)")
    parser.add_argument("--search", action="store_true",
                        help="the demo search: the default vs --config.search.parallel=1 "
                             "vs a hand-written Keras loop")
    parser.add_argument("--checkpoints", action="store_true",
                        help="the demo search with checkpoints every epoch, at the default "
                             "spacing and never; the bytes a checkpoint writes")
    parser.add_argument("--halving", action="store_true",
                        help="the demo over the whole network: exhaustive against halving, on "
                             "--tasks")
    parser.add_argument("--determinism", action="store_true",
                        help="the demo search twice in fresh workdirs, the second beside a "
                             "process holding most of the memory and every core; checks that "
                             "results.jsonl is the same bitwise (but the seconds)")
    parser.add_argument("--against", default=None, metavar="COMMIT",
                        help="the search (--search-config) at COMMIT, then in this checkout, "
                             "each from an empty compilation cache: the wall-time ratio")
    parser.add_argument("--compile-programs", default=None, metavar="SETS",
                        help="compile (not train) the engines of these trained sets (comma "
                             "list of --trainable values) as a search does: seconds per "
                             "program kind")
    parser.add_argument("--recipes", action="store_true",
                        help="the demo search as it ships against the best fixed recipe "
                             "(classifier-only and full under every setting), on --tasks")
    parser.add_argument("--tasks", default=",".join(HALVING_TASKS),
                        help="with --halving: the tasks (demo: digits 5-9 from a backbone "
                             "pretrained on 0-4; swapped: 0-4 from 5-9)")
    parser.add_argument("--scratch", default=None,
                        help="with --halving: the directory of the searches (default: a new "
                             "temporary one); searches timed there before are not run again")
    parser.add_argument("--keras-runs", type=int, default=None,
                        help="with --search: time only the first N Keras runs, extrapolate")
    parser.add_argument("--search-config", default="configs/demo.py",
                        help="with --search: the config file searched (default: the demo)")
    parser.add_argument("--search-override", action="append", default=[],
                        help="with --search: a --config.x=y override for every search")
    parser.add_argument("--no-keras", action="store_true",
                        help="with --search: skip the Keras loop")
    parser.add_argument("--cache-states", default="empty,filled",
                        help="with --search: the JAX compilation cache states to time "
                             "(empty, filled or both)")
    parser.add_argument("--runs", type=int, default=1,
                        help="blockft_jax: K runs of the row in one cohort (vmapped); images/s "
                             "counts every run's images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker-timeout", type=float, default=3600.0,
                        help="seconds allowed to each framework's subprocess")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        return worker(args)

    from blockft_jax import models  # light: checks the model name before any subprocess
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown or not frameworks:
        parser.error(f"--frameworks: unknown {unknown}; choose from {','.join(FRAMEWORKS)}")
    for value, name in ((args.batch, "--batch"), (args.size, "--size"),
                        (args.images, "--images"), (args.epochs, "--epochs")):
        if value < 1:
            parser.error(f"{name} must be >= 1")

    if args.search:
        return search_benchmark(args)
    if args.determinism:
        return determinism_benchmark(args)
    if args.against:
        return against_benchmark(args)
    if args.checkpoints:
        return checkpoint_benchmark(args)
    if args.compile_programs:
        return compile_benchmark(args)
    if args.halving or args.recipes:
        unknown = sorted(set(args.tasks.split(",")) - set(HALVING_TASKS))
        if unknown:
            parser.error(f"--tasks: unknown {unknown}; choose from {','.join(HALVING_TASKS)}")
        return halving_benchmark(args) if args.halving else recipe_benchmark(args)

    if args.input_check:
        if args.model not in models.MODEL_NAMES:
            parser.error(f"--model {args.model!r}: choose from {', '.join(models.MODEL_NAMES)}")
        r = launch("blockft_jax_step" if args.no_cache else "blockft_jax", args.model,
                   args.trainable, args)
        if not r.get("ok"):
            print(f"input check FAILED: {r.get('error')}\n{r.get('log', '')}")
            sys.exit(1)
        print(f"## input pipeline: {args.model}, trainable={args.trainable}, "
              f"{'step level' if not r['cached'] else 'fine-tuning level (prefix cache)'}, "
              f"from unit {r['from_unit']}, batch {args.batch}, {args.size}px, "
              f"{args.images} images, {args.epochs} epochs (interleaved)")
        print(f"tf_flowers{' (TFDS mock data)' if r['mock_data'] else ''} loaded by "
              f"data.load_dataset in {r['load_s']:.1f} s (once; cached on disk afterwards)")
        print(f"pipeline images_per_s={r['images_per_s']:.2f}")
        print(f"device_resident images_per_s={r['device_resident_images_per_s']:.2f}")
        print(f"ratio pipeline/device_resident = {r['pipeline_ratio']:.3f}")
        return

    if args.all:
        table = []
        for model, trainable in ROWS:
            results = run_row(model, trainable, args, frameworks)
            print_row(model, trainable, args, frameworks, results, file=sys.stderr)  # progress
            table.append(((model, trainable), results))
        print_all_table(args, frameworks, table)
        return

    if args.model not in models.MODEL_NAMES:
        parser.error(f"--model {args.model!r}: choose from {', '.join(models.MODEL_NAMES)}")
    results = run_row(args.model, args.trainable, args, frameworks)
    print_row(args.model, args.trainable, args, frameworks, results)
    for fw in frameworks:
        r = results[fw]
        print(f"{fw} images_per_s={_fmt(r['images_per_s'] if r.get('ok') else None)}")


if __name__ == "__main__":
    main()
