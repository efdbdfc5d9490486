"""What the throughput scripts share (scripts/benchmark.py against Keras, scripts/gpu_check.py
against PyTorch): a fine-tuning job set up from a model name and a trained set the way the
search sets one up, on random variables and synthetic data; K runs of it in a cohort, stepped
on batches placed on the device once (the step alone, no host loop) or epoch by epoch; and the
harness that runs each measurement in its own process and reads its result back.

The search imports only `random_variables` (the dry run's timed step). At module level this
imports the standard library only: the harness also serves gpu_check's PyTorch worker, whose
interpreter may lack JAX.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import subprocess
import time
import traceback
from typing import Any, Callable

NUM_CLASSES = 5


# --- the job ----------------------------------------------------------------------------------

def in_trained_set(name: str, trainable: str) -> bool:
    """Whether a backbone layer named `name` trains, for `trainable` = 'head' (none: only the
    head, which always trains), 'all' or a Keras layer-name prefix (e.g. 'block_16')."""
    return trainable == "all" or (trainable != "head" and name.startswith(trainable))


def synthetic_data(n: int, size: int, seed: int):
    """`n` uint8 images (size x size x 3) and int32 labels of NUM_CLASSES classes: the same in
    every worker for the same arguments."""
    import numpy as np
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, (n,)).astype(np.int32)
    return images, labels


def random_variables(module, shape, seed: int) -> dict:
    """Variables like `module.init`'s (LeCun-normal kernels, zero biases, unit BN), drawn with
    numpy from `jax.eval_shape`: compiling the whole model's init costs tens of seconds on CPU
    and is not what is measured (throughput does not depend on the values)."""
    import numpy as np
    from flax import traverse_util

    from blockft_jax import models  # here: the harness imports no JAX

    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in traverse_util.flatten_dict(dict(models.variable_shapes(module,
                                                                             shape))).items():
        if path[-1] == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(0.0, np.sqrt(1.0 / fan_in), leaf.shape)
        elif path[-1] in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:  # biases, BN offsets and moving means
            value = np.zeros(leaf.shape)
        flat[path] = np.asarray(value, leaf.dtype)
    variables = traverse_util.unflatten_dict(flat)
    variables.setdefault("batch_stats", {})  # as weights.py: the same structure without BN
    return variables


class _Config(dict):
    """The few `train` config entries make_optimizer reads, without ml_collections (not every
    GPU machine has it)."""
    __getattr__ = dict.__getitem__


@dataclasses.dataclass
class Job:
    """One candidate of one model: the engine from the lowest unit it trains, its mask and BN
    modes, random variables."""
    model: str
    trainable: str
    seed: int
    module: Any
    table: list
    variables: dict
    layers: tuple            # the trained backbone layers (Keras names; the head trains too)
    from_unit: str
    cached: bool             # the engine takes the prefix cache's features, not images
    engine: Any              # train.Engine
    mask: dict
    bn_modes: dict

    @property
    def units(self) -> int:
        return len(self.module.unit_names())

    @property
    def batch_stat_bn(self) -> list[str]:
        """The BatchNorm layers that use batch statistics (those in the trained set)."""
        return [name for name, on in self.bn_modes.items() if bool(on)]

    @property
    def trainable_params(self) -> int:
        import numpy as np
        from flax import traverse_util

        mask = traverse_util.flatten_dict(self.mask)
        params = traverse_util.flatten_dict(self.variables["params"])
        return int(sum(np.size(params[k]) for k, trains in mask.items() if bool(trains)))

    def start(self, runs: int) -> "Runs":
        """`runs` runs of this candidate (seeds seed, seed + 1, ...) in a cohort, fresh."""
        import numpy as np

        # here, not at the top: the harness imports no JAX (docstring)
        from blockft_jax.engine import cohort as cohort_lib

        cohort = cohort_lib.Cohort(self.engine, runs)
        members = [cohort_lib.Run(self.mask, self.bn_modes, seed=self.seed + i)
                   for i in range(runs)]
        masks, bn_modes, keys = cohort.stack_inputs(members)
        active = cohort.place_runs(np.ones(runs, bool))
        return Runs(cohort, cohort.init(self.variables, members), masks, bn_modes, keys,
                    active, [r.seed for r in members])


def setup(model: str, trainable: str, *, size: int, width: float = 1.0, seed: int = 0,
          dtype: str | None = None, cache: bool = False) -> Job:
    """The job for `model` (a models name) training `trainable` (see `in_trained_set`) at
    `size` px, Adam 1e-3, NUM_CLASSES classes. `dtype` ('bfloat16', 'float32'): the compute
    dtype (parameters stay float32); None: the model's default. `cache`: take the prefix
    cache's features (as the search does) when there is a frozen prefix below the lowest
    trained unit; otherwise every step runs the prefix too (the step level)."""
    import jax.numpy as jnp

    # here, not at the top: the harness imports no JAX (docstring)
    from blockft_jax import models
    from blockft_jax.candidates import groups
    from blockft_jax.engine import train

    options = {} if dtype is None else {"dtype": getattr(jnp, dtype)}
    module = models.create(model, num_classes=NUM_CLASSES, width=width, **options)
    shape = (size, size, 3)
    table = models.layer_table(module, shape)
    variables = random_variables(module, shape, seed)
    backbone = groups.backbone_layers(table)
    layers = tuple(r.name for r in backbone if in_trained_set(r.name, trainable))
    if trainable not in ("head", "all") and not layers:
        raise ValueError(f"No weighted layer of {model} starts with {trainable!r}; its top "
                         f"layers: {[r.name for r in backbone[-8:]]}")
    group = groups.Group("benchmark", f"benchmark:{trainable}", layers)
    from_unit = groups.lowest_unit(table, [group])
    cached = cache and from_unit != module.unit_names()[0]
    # A constant learning rate: the step count the schedule is made for does not matter.
    tx = train.make_optimizer(_Config(optimizer="adam", learning_rate=1e-3, epochs=1), 1)
    engine = train.Engine(module, tx, from_unit, train.data_mesh(), cached=cached, table=table,
                          prefix_chunk_bytes=train.default_prefix_chunk_bytes())
    return Job(model, trainable, seed, module, table, variables, layers, from_unit, cached,
               engine, groups.param_mask(variables["params"], table, layers),
               groups.bn_modes(table, layers))


@dataclasses.dataclass
class Runs:
    """K runs of a job in a cohort (`Job.start`): their state and stacked inputs."""
    cohort: Any              # cohort.Cohort
    state: Any               # cohort.CohortState
    masks: Any
    bn_modes: Any
    keys: Any
    active: Any
    seeds: list[int]

    def feed(self, images, labels, weights=None) -> tuple:
        """A batch for every run, (runs, batch, ...) host arrays, placed on the device once as
        the fed train step takes it (weights: all ones by default)."""
        import numpy as np
        if weights is None:
            weights = np.ones(labels.shape, np.float32)
        return self.cohort.feed(images), self.cohort.feed(labels), self.cohort.feed(weights)

    def _step_args(self, fed: tuple) -> tuple:
        return (self.state.shared, self.state.runs, self.masks, self.bn_modes, *fed, self.keys,
                self.active)

    def lower(self, fed: tuple):
        """The fed train step lowered for this state and batch (jax.stages.Lowered)."""
        return self.cohort.train_step.lower(*self._step_args(fed))

    def step(self, fed: tuple) -> dict:
        """One train step of every run on a batch from `feed`; its metrics (device arrays)."""
        runs, metrics = self.cohort.train_step(*self._step_args(fed))
        self.state = dataclasses.replace(self.state, runs=runs)
        return metrics

    def epoch(self, split, batch_size: int, epoch: int) -> list[float]:
        """One epoch of every run as the search trains it (`cohort.train_epoch`: each run's
        own order; a DeviceSplit's batches gathered on the device, a host split's fed);
        every run's train loss."""
        # here, not at the top: the harness imports no JAX (docstring)
        from blockft_jax.engine import cohort as cohort_lib
        self.state, losses, _, _ = cohort_lib.train_epoch(
            self.cohort, self.state, self.masks, self.bn_modes, split, batch_size, self.seeds,
            epoch, self.keys, [True] * self.cohort.size)
        return losses

    @property
    def compilations(self) -> dict:
        """Traces of the engine's feature pass and the cohort's steps so far."""
        return {**self.cohort.engine.compilations, **self.cohort.compilations}


# --- the harness: each measurement in its own process -----------------------------------------

RESULT_TAG = "BLOCKFT_RESULT "


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def report(measure: Callable[[], dict]) -> None:
    """A worker's end: runs `measure` and prints its result as one tagged JSON line, with
    `ok` and the process's peak memory; a failure is printed (traceback on stderr) as
    {'ok': False, 'error'}, never raised: the parent reports it and goes on."""
    try:
        result = dict(measure(), ok=True)
    except Exception as e:
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    result["peak_rss_mb"] = peak_rss_mb()
    print(RESULT_TAG + json.dumps(result), flush=True)


def launch(cmd: list[str], *, env: dict | None = None, timeout: float) -> dict:
    """Runs a worker (`cmd`, which ends in `report`) in its own process session, killed whole
    after `timeout` seconds; returns its result, or {'ok': False, 'error'}; never raises.
    A failed result carries the end of the worker's output ('log'); every result its wall
    seconds ('process_s')."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout, 1.0))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own children (compile workers) too
        out, err = proc.communicate()
        timed_out = True
    result = None
    for line in (out or "").splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
    if result is None:
        result = {"ok": False, "error": (f"timed out after {timeout:.0f} s" if timed_out else
                                         f"the worker exited with status {proc.returncode} "
                                         "without a result")}
    if not result.get("ok"):
        result["log"] = ((err or "") + (out or ""))[-4000:]
    result["process_s"] = time.perf_counter() - started
    return result


def worker_env(**overrides: str | None) -> dict:
    """This process's environment for a worker: the repository on PYTHONPATH (an interpreter
    without the package installed finds it), TensorFlow's C++ logging quiet, and `overrides`
    (None removes a variable)."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env
