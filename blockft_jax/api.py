"""A search from Python -- a notebook, a script -- in one call, and what it found.

    from blockft_jax import api
    result = api.run("demo", train={"epochs": 10}, search={"engines": 2})
    result.winner["candidate"], result.model_path
    result.table                   # every candidate ranked: a list of records
    result.frame()                 # the same as a pandas DataFrame (pandas installed)
    result.predict(images)         # the winner's class probabilities, uint8 RGB images

`config` is a config file (`"configs/demo.py"`), the name of one of the package's configs
(`"demo"`), or a ConfigDict; overrides come as sections (`train={"epochs": 10}`) or dotted keys
(`overrides={"train.epochs": 10}`), checked as the command line checks them. Progress goes to
the log as on the command line, line by line. A mistake raises `errors.UserError` with the
one-line message the command line prints. The command line (`launch.run`) is built on `run`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from blockft_jax import cli
from blockft_jax import predict as predict_lib
from blockft_jax.common import cores, multihost
from blockft_jax.common import workdir as workdir_lib
from blockft_jax.common.errors import UserError
from blockft_jax.inputs import weights
from blockft_jax.search import plan, results, search

log = logging.getLogger("blockft_jax")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the package's own configs


class ConfigError(UserError, ValueError):
    """A config that cannot be loaded, or an override it does not take."""


@dataclasses.dataclass
class SearchResult:
    """What a search found, read from its workdir: `summary` is summary.json."""
    workdir: Path
    summary: dict

    @property
    def winner(self) -> dict:
        return self.summary["winner"]

    @property
    def model_path(self) -> Path | None:
        """The winner's saved model (`models/best`), for `predict` and `export`."""
        best = self.summary.get("best_model")
        return self.workdir / best if best else None

    @property
    def table(self) -> list[dict[str, Any]]:
        """Every candidate, best first: one record each (strategy, candidate, layers,
        validation and test accuracy over seeds, status), as the report ranks them."""
        ranked = results.rank(workdir_lib.Workdir(self.workdir).results())
        return [{"strategy": c["strategy"], "candidate": c["candidate"],
                 "layers": len(c["layers"]), "depth": c["depth"],
                 "bn_policy": c["bn_policy"], "lr_factor": c["lr_factor"], "seeds": c["seeds"],
                 "val_accuracy": c["val_accuracy"]["mean"],
                 "val_accuracy_std": c["val_accuracy"]["std"],
                 "test_accuracy": (c["test_accuracy"] or {}).get("mean"),
                 "pruned": c["pruned"], "diverged": c["diverged"]} for c in ranked]

    def frame(self):
        """`table` as a pandas DataFrame."""
        try:
            import pandas
        except ImportError:
            raise ImportError("SearchResult.frame() needs pandas: pip install pandas (or use "
                              "SearchResult.table, the same records as a list).") from None
        return pandas.DataFrame.from_records(self.table)

    def predict(self, images, batch_size: int = 32):
        """The winner's class probabilities (n, classes) for uint8 RGB images of its input
        size; the class names are `self.summary`'s model's (`predict.load(...).classes`)."""
        return predict_lib.load(self.model_path).probabilities(images, batch_size)


def run(config: str | ConfigDict, *, workdir: str | Path | None = None,
        start_over: bool = False, overrides: dict | None = None,
        **sections: dict) -> SearchResult:
    """Runs (or resumes) the search `config` describes, in `workdir` (default
    runs/<config name>), and returns what it found."""
    config, name = load(config, overrides, sections)
    # A notebook: the command line's lines, on stderr. Never on another process of a pod,
    # whose quiet the launcher set (one copy of the progress: process 0's).
    if multihost.is_leader() and not log.isEnabledFor(logging.INFO):
        cli.setup_logging()
    workdir = Path(workdir or Path("runs") / name).expanduser().absolute()
    resolve_paths(config)
    use_compilation_cache()
    log.info("JAX %s: %d process(es), %d device(s): %s%s", jax.__version__,
             jax.process_count(), jax.device_count(), jax.devices()[0].device_kind,
             _cpu_devices_note())
    log.info("Results go to %s (log: %s)", workdir, workdir / workdir_lib.LOG)
    summary = search.run(config, workdir, start_over=start_over)
    return SearchResult(workdir, json.loads(json.dumps(summary)))


def _cpu_devices_note() -> str:
    """On a CPU: whether JAX has a device per physical core, and if not how to give it one (a
    notebook has imported JAX before us, with one CPU device unless XLA_FLAGS said more)."""
    if jax.devices()[0].platform != "cpu":
        return ""
    physical = cores.physical_cores()
    if jax.local_device_count() == physical:
        return ", one per physical core"
    if cores.DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
        return f" (as XLA_FLAGS asks; this machine has {physical} physical core(s))"
    return (f"; this machine has {physical} physical core(s): blockft_jax.common.cores."
            f"use_every_core() before JAX is imported trains runs side by side on them "
            f"(docs/operations.md, 'CPU')")


def load(config: str | ConfigDict, overrides: dict | None = None,
         sections: dict | None = None) -> tuple[ConfigDict, str]:
    """The config (a copy) with its overrides applied, and its name (for the workdir)."""
    if isinstance(config, ConfigDict):
        config, name = ConfigDict(config.to_dict(), type_safe=True), "search"
    else:
        path = Path(config)
        if not path.suffix and not path.exists() and (CONFIGS / f"{config}.py").exists():
            path = CONFIGS / f"{config}.py"  # a name: one of the package's configs
        cli.configs_importable(["--config", str(path)])  # its `from configs import default`
        loaded = cli.load_config_file(str(path))
        if isinstance(loaded, str):
            raise ConfigError(loaded.replace("--config ", "config ", 1))
        config, name = loaded, path.stem
    dotted = dict(overrides or {})
    for section, values in (sections or {}).items():
        if not isinstance(values, dict):
            raise ConfigError(f"{section}={values!r}: give a section's keys as a dict, e.g. "
                              f"train={{'epochs': 5}}.")
        dotted.update({f"{section}.{key}": value for key, value in values.items()})
    for key, value in dotted.items():
        _set(config, key, value)
    config.lock()
    return config, name


def _set(config: ConfigDict, key: str, value) -> None:
    if not cli.has_key(config, key) or hasattr(cli.get_key(config, key), "keys"):
        raise ConfigError(f"config has no key {key}{cli.closest_key(config, key)}.")
    parent, _, leaf = key.rpartition(".")
    node = cli.get_key(config, parent) if parent else config
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}={value!r}: {cli.first_line(e)}.") from None


def resolve_paths(config) -> None:
    """Makes every path in `config` absolute, once, here at the edge: the search may change
    directory-sensitive libraries (orbax refuses relative paths) and its workdir records them."""
    def absolute(path):
        if path is None or "://" in path:  # gs://, s3://: remote, already absolute
            return path
        return str(Path(path).expanduser().absolute())

    config.data.path = absolute(config.data.path)
    config.data.data_dir = absolute(config.data.data_dir)
    if config.model.weights not in plan.WEIGHT_SOURCES:
        config.model.weights = absolute(config.model.weights)


def use_compilation_cache() -> None:
    if not jax.config.jax_compilation_cache_dir:
        # A resumed (preempted) or repeated search reuses its compiled steps.
        jax.config.update("jax_compilation_cache_dir",
                          str(weights.cache_dir() / "jax_compilation"))
        # Small programs too (the head init, eval steps: 0.2-0.5 s each on CPU).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
