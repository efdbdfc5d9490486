"""report.md (the paper's comparison table and each strategy's ranking) and report.png
(accuracy per candidate against depth), rebuilt from results.jsonl and summary.json:

    python -m blockft_jax.report --workdir runs/mobilenet_v2
"""
from __future__ import annotations

import json
from pathlib import Path

LABELS = {"classifier_only": "Classifier only (baseline)", "full": "Full fine-tuning (baseline)",
          "layerwise": "Layer-wise", "topk": "Top-k layers", "blocks": "Blocks",
          "window": "Sliding window"}


def _pm(stat) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat["mean"] == stat["mean"] else "-"


def markdown(summary: dict) -> str:
    lines = [f"# Block-wise fine-tuning: {summary['model']} on {summary['dataset']}", "",
             f"Selection: {summary['selection']}.", "",
             "| strategy | selected candidate | trained layers | validation acc. | test acc. |",
             "|---|---|---|---|---|"]
    for strategy, s in summary["strategies"].items():
        c = s["selected"]
        lines.append(f"| {LABELS[strategy]} | `{c['candidate']}` | {len(c['layers'])} | "
                     f"{_pm(c['val_accuracy'])} | {_pm(c['test_accuracy'])} |")
    w = summary["winner"]
    lines += ["", f"**Winner:** `{w['candidate']}` ({LABELS[w['strategy']]}), validation "
              f"{_pm(w['val_accuracy'])}, test {_pm(w['test_accuracy'])}.",
              f"Train-step compilations: {summary['train_step_compilations']}.", ""]
    for strategy, s in summary["strategies"].items():
        if len(s["ranking"]) < 2:
            continue
        lines += [f"## {LABELS[strategy]}: ranking", "",
                  "| rank | candidate | depth | validation acc. | test acc. | diverged |",
                  "|---|---|---|---|---|---|"]
        for i, c in enumerate(s["ranking"], 1):
            lines.append(f"| {i} | `{c['candidate']}` | {c['depth']} | {_pm(c['val_accuracy'])}"
                         f" | {_pm(c['test_accuracy'])} | {c['diverged']} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    searched = {k: v for k, v in summary["strategies"].items()
                if k not in ("classifier_only", "full")}
    fig, axes = plt.subplots(1, max(len(searched), 1), figsize=(4 * max(len(searched), 1), 3.2),
                             squeeze=False, sharey=True)
    for ax, (strategy, s) in zip(axes[0], searched.items()):
        ranking = sorted(s["ranking"], key=lambda c: c["depth"])
        x = [c["depth"] for c in ranking] if strategy != "topk" else \
            [len(c["layers"]) for c in ranking]
        ax.errorbar(x, [c["val_accuracy"]["mean"] for c in ranking],
                    yerr=[c["val_accuracy"]["std"] for c in ranking], marker="o",
                    label="validation", capsize=2)
        ax.plot(x, [c["test_accuracy"]["mean"] for c in ranking], "s--", label="test",
                alpha=0.6)
        for base, style in (("classifier_only", ":"), ("full", "-.")):
            if base in summary["strategies"]:
                ax.axhline(summary["strategies"][base]["selected"]["val_accuracy"]["mean"],
                           linestyle=style, color="grey", label=LABELS[base])
        ax.set_title(LABELS[strategy])
        ax.set_xlabel("k (layers)" if strategy == "topk" else "depth below the output (layers)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    if searched:
        axes[0][0].legend(fontsize=7)
    else:
        axes[0][0].text(0.5, 0.5, "baselines only: see report.md", ha="center",
                        transform=axes[0][0].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(workdir) -> None:
    workdir = Path(workdir)
    summary_path = workdir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path} not found: run the search first.")
    summary = json.loads(summary_path.read_text())
    from blockft_jax.workdir import write_atomic
    write_atomic(workdir / "report.md", markdown(summary) + "\n")
    plot(summary, workdir / "report.png")


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description="Rebuild report.md and report.png.")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    write(args.workdir)
    print(f"wrote {Path(args.workdir) / 'report.md'} and report.png")


if __name__ == "__main__":
    main()
