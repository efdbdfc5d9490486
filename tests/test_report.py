"""report.py: report.md and report.png from summary.json, with and without paired comparisons
(synthetic workdirs, no training)."""
import copy
import json

import matplotlib.image
import numpy as np

from blockft_jax import report as report_command
from blockft_jax.search import report, results
from test_results import ACCURACY, CONFIG, fake_search


def workdir_with(tmp_path, accuracy=ACCURACY, predictions=True, **options):
    predictions_dir = tmp_path / results.PREDICTIONS_DIR
    rows = fake_search(predictions_dir, accuracy, **options)
    summary = results.summarize(CONFIG, rows, 2,
                                predictions_dir=predictions_dir if predictions else None)
    (tmp_path / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def test_report_says_whether_the_winner_is_better(tmp_path):
    summary = workdir_with(tmp_path)
    report_command.main(["--workdir", str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    assert "## Is the winner better?" in text
    assert summary["verdict"] in text
    lines = [line for line in text.splitlines() if line.startswith("- `topk:2` vs ")]
    assert len(lines) == 6
    assert [line.split(" on ")[1].split(",")[0] for line in lines] == ["validation"] * 3 + \
        ["test"] * 3
    for c, line in zip(summary["comparisons"], lines):
        lo, hi = c["ci95"]
        verdict = "distinguishable" if c["distinguishable"] else "not distinguishable"
        assert line == (f"- `topk:2` vs `{c['b']}`: {c['difference']:+.3f} on {c['split']}, "
                        f"95% interval {lo:+.3f} to {hi:+.3f}: {verdict}")
    assert "paired bootstrap over examples and seeds, 2000 replicates" in text
    assert "about 800 examples (4x) would halve them" in text  # 200 validation examples


def test_an_undecided_comparison_says_what_would_firm_it_up(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.random((2, 100)) < 0.6
    winner = base.copy()
    winner[:, np.flatnonzero(~base.any(axis=0))[:2]] = True  # two more right, on every seed
    summary = workdir_with(tmp_path, {
        "classifier_only": {"validation": base, "test": base},
        "layerwise:block_16_project": {"validation": winner, "test": winner}},
        n_val=100, n_test=100, seeds=2)
    c = summary["comparisons"][0]
    assert not c["distinguishable"]
    text = report.markdown(summary)
    expected = results.firmer_answer(c)["examples_to_exclude_zero"]
    assert f"exclude 0 against classifier_only at about {expected:,} examples" in text
    assert "2 seeds measure only roughly" in text


def test_report_png_shows_the_intervals(tmp_path):
    workdir_with(tmp_path)
    report.write(tmp_path)
    with_intervals = matplotlib.image.imread(tmp_path / "report.png")
    plain = tmp_path / "plain"
    plain.mkdir()
    workdir_with(plain, predictions=False)
    report.write(plain)
    without = matplotlib.image.imread(plain / "report.png")
    # Same accuracy panels; the forest plot of the six comparisons is added below them.
    assert with_intervals.shape[0] > without.shape[0] + 100


def test_report_without_comparisons_still_builds(tmp_path):
    summary = workdir_with(tmp_path, predictions=False)
    assert "comparisons" not in summary
    report_command.main(["--workdir", str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    assert "Is the winner better?" not in text
    assert "No per-example predictions in this workdir" in text
    assert (tmp_path / "report.png").stat().st_size > 0


def test_report_with_validation_only(tmp_path):
    workdir_with(tmp_path, n_test=None)
    report.write(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert " on test," not in text and text.count(" on validation,") == 3
    assert (tmp_path / "report.png").stat().st_size > 0


def test_one_seed_says_training_randomness_is_left_out(tmp_path):
    summary = workdir_with(tmp_path, seeds=1)
    text = report.markdown(summary)
    assert "200 validation examples and 1 seed," in text
    assert "With one seed these intervals leave out training randomness" in text


def test_report_png_counts_whole_layers(tmp_path, monkeypatch):
    """The accuracy panels' x axes are counts of layers: no tick at k = 2.5."""
    import matplotlib.figure
    summary = workdir_with(tmp_path)
    topk = summary["strategies"]["topk"]["ranking"]
    topk.append({**topk[0], "candidate": "topk:3", "layers": topk[0]["layers"] + ["x"]})
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *args, **kwargs: figures.append(self))
    report.plot(summary, tmp_path / "report.png")
    axes = {ax.get_title(): ax for ax in figures[0].get_axes()}
    for title in ("Top-k layers", "Layer-wise"):
        low, high = axes[title].get_xlim()
        ticks = [t for t in axes[title].get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), (title, ticks)


def test_blocks_of_units_are_named_the_surgical_fine_tuning_oracle(tmp_path):
    """With search.block_boundaries='units', a block is one unit trained alone, picked on
    validation: Lee et al.'s (ICLR 2023) surgical fine-tuning oracle, and the report says so."""
    accuracy = {"classifier_only": 0.5, "blocks:block_16": 0.7, "full": 0.6}
    for boundaries, named in (("pooling,activation", False), ("units", True)):
        config = copy.deepcopy(CONFIG)
        config.search.block_boundaries = boundaries
        rows = fake_search(tmp_path / boundaries, accuracy)
        summary = results.summarize(config, rows, 2, predictions_dir=tmp_path / boundaries)
        text = report.markdown(summary)
        oracle = "Blocks = units (the surgical fine-tuning oracle)"
        assert (f"| {oracle} | `blocks:block_16` |" in text) == named
        assert (f"**Winner:** `blocks:block_16` ({oracle})" in text) == named
        assert ("| Blocks | `blocks:block_16` |" in text) != named
