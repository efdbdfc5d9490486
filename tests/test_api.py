"""The search from Python (blockft_jax/api.py): one call from a config's name, a file or a
ConfigDict with overrides, a result holding the summary, the ranked table, the winner's model
and its predictions; mistakes as the command line's one line; the notebook walkthrough in
docs/ runs as written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blockft_jax import api
from blockft_jax import predict as predict_lib
from blockft_jax.common import cores
from blockft_jax.common.errors import UserError
from configs import tiny

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"search.strategies": ("classifier_only", "layerwise"), "train.seeds": 1}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("api")
    return api.run("tiny", workdir=workdir, overrides=QUICK, search={"max_layers": 2})


def test_one_call_returns_what_the_search_wrote(result):
    assert result.summary == json.loads((result.workdir / "summary.json").read_text())
    assert result.winner["candidate"] == result.table[0]["candidate"]
    assert result.model_path == result.workdir / "models" / "best"
    assert {r["strategy"] for r in result.table} == {"classifier_only", "layerwise"}
    assert len([r for r in result.table if r["strategy"] == "layerwise"]) == 2  # max_layers
    accuracies = [r["val_accuracy"] for r in result.table if not r["pruned"]]
    assert accuracies == sorted(accuracies, reverse=True)


def test_the_winner_predicts_as_the_command_line_does(result):
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    got = result.predict(images)
    want = predict_lib.load(result.model_path).probabilities(images)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


def test_the_table_as_a_dataframe(result):
    pandas = pytest.importorskip("pandas")
    frame = result.frame()
    assert isinstance(frame, pandas.DataFrame) and len(frame) == len(result.table)
    assert list(frame["candidate"]) == [r["candidate"] for r in result.table]


def test_a_config_dict_and_a_file_give_the_same_config(tmp_path):
    from_file, name = api.load(str(ROOT / "configs" / "tiny.py"), {"train.epochs": 3})
    from_dict, _ = api.load(tiny.get_config(), None, {"train": {"epochs": 3}})
    assert name == "tiny" and from_file.to_dict() == from_dict.to_dict()
    given = tiny.get_config()
    api.load(given, {"train.epochs": 3})
    assert given.train.epochs != 3  # the caller's ConfigDict is left as it was


@pytest.mark.parametrize("kwargs,message", [
    ({"overrides": {"train.epoks": 3}}, "did you mean train.epochs"),
    ({"overrides": {"train.epochs": "three"}}, "train.epochs='three'"),
    ({"train": 3}, "train=3: give a section's keys as a dict"),
    ({"train": {"epochs": 0}}, "train.epochs=0"),  # refused by the plan's checks, as on the CLI
])
def test_mistakes_are_the_command_lines_one_line(kwargs, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        api.run("tiny", workdir=tmp_path / "wd", **kwargs)
    assert not (tmp_path / "wd").exists()  # nothing written


def test_an_unknown_config_names_what_there_is():
    with pytest.raises(UserError, match="no such file"):
        api.run("configs/tiny_typo.py")


@pytest.mark.slow
def test_the_notebook_walkthrough_runs_as_written(tmp_path):
    """docs/notebook.py, cell after cell, from a folder of its own (relative workdir); its
    first cell gives JAX one CPU device per physical core."""
    env = {k: v for k, v in os.environ.items()  # the installed package, no device count
           if k not in ("PYTHONPATH", "XLA_FLAGS")}
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "notebook.py")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Winner:" in done.stdout and (tmp_path / "runs" / "notebook" / "report.md").exists()
    devices = cores.physical_cores()
    assert f"CPU devices: {devices}" in done.stdout
    assert f"{devices} device(s): cpu, one per physical core" in done.stderr
    assert "\r" not in done.stdout + done.stderr  # line by line, as captured in a notebook
    assert "Results go to" in done.stderr and "INFO:" not in done.stderr  # each line once


def test_the_first_line_says_whether_a_cpu_has_a_device_a_core(monkeypatch):
    """Fewer CPU devices than physical cores (a notebook imported JAX first): the search's first
    line says how to get one a core, or that XLA_FLAGS chose the count."""
    import jax
    monkeypatch.setattr(cores, "physical_cores", lambda: jax.local_device_count() + 1)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert "cores.use_every_core() before JAX is imported" in api._cpu_devices_note()
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert "as XLA_FLAGS asks" in api._cpu_devices_note()
    monkeypatch.setattr(cores, "physical_cores", jax.local_device_count)
    assert api._cpu_devices_note() == ", one per physical core"
