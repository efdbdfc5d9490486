"""report.md (the paper's comparison table, whether the winner is really better, and each
strategy's ranking) and report.png (accuracy per candidate against depth; the winner's paired
differences with their 95% intervals), rebuilt from summary.json:

    python -m blockft_jax.report --workdir runs/mobilenet_v2
"""
from __future__ import annotations

import json
from pathlib import Path

from blockft_jax.candidates.strategies import BASELINES, LABELS, REGISTRY
from blockft_jax.common.durable import write_atomic
from blockft_jax.search import results

# How each baseline's line looks on the searched strategies' plots.
BASELINE_STYLES = {name: REGISTRY[name].style for name in BASELINES}


def _label(summary: dict, strategy: str) -> str:
    """A strategy's name as the search called it (older summaries: the registry's)."""
    return summary.get("labels", {}).get(strategy) or LABELS[strategy]


def _pm(stat) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat["mean"] == stat["mean"] else "-"


def markdown(summary: dict) -> str:
    lines = [f"# Block-wise fine-tuning: {summary['model']} on {summary['dataset']}", "",
             f"Selection: {summary['selection']}.", "",
             "| strategy | selected candidate | trained layers | validation acc. | test acc. |",
             "|---|---|---|---|---|"]
    for strategy, s in summary["strategies"].items():
        c = s["selected"]
        lines.append(f"| {_label(summary, strategy)} | `{c['candidate']}` | {len(c['layers'])} | "
                     f"{_pm(c['val_accuracy'])} | {_pm(c['test_accuracy'])} |")
    w = summary["winner"]
    lines += ["", f"**Winner:** `{w['candidate']}` ({_label(summary, w['strategy'])}): "
              f"{_trains(w)}; validation {_pm(w['val_accuracy'])}, test "
              f"{_pm(w['test_accuracy'])}.",
              f"Train-step compilations: {summary['train_step_compilations']}.", ""]
    lines += is_the_winner_better(summary)
    lines += what_the_setting_did(summary)
    lines += what_each_rung_pruned(summary)
    lines += the_rounds(summary)
    for strategy, s in summary["strategies"].items():
        if len(s["ranking"]) < 2:
            continue
        halved = any(c.get("pruned") for c in s["ranking"])
        lines += [f"## {_label(summary, strategy)}: ranking", "",
                  "| rank | candidate | depth | validation acc. | test acc. | diverged |" +
                  (" searched |" if halved else ""),
                  "|---|---|---|---|---|---|" + ("---|" if halved else "")]
        for i, c in enumerate(s["ranking"], 1):
            searched = (f" pruned after {c['epochs']} epoch(s), {c['seeds']} seed(s) |"
                        if c.get("pruned") else " finalist |") if halved else ""
            lines.append(f"| {i} | `{c['candidate']}` | {c['depth']} | {_pm(c['val_accuracy'])}"
                         f" | {_pm(c['test_accuracy'])} | {c['diverged']} |{searched}")
        if halved:
            lines.append("")
            lines.append("Successive halving: only the finalists trained every seed to the "
                         "last epoch and can be selected; a pruned candidate's accuracy is at "
                         "its best epoch before it was pruned.")
        lines.append("")
    return "\n".join(lines)


def _trains(c: dict) -> str:
    """'3 layers and the head, BatchNorm frozen, backbone learning rate x1'."""
    layers = len(c["layers"])
    what = f"{layers} layer{'s' if layers != 1 else ''} and the head" if layers else "the head"
    return (f"trains {what}, BatchNorm {c.get('bn_policy', 'train')}, backbone learning rate "
            f"x{c.get('lr_factor', 1.0):g}")


def _setting_words(c: dict) -> str:
    """'BatchNorm policy: frozen beats train by +0.320 [+0.270, +0.370]' (the parts that
    differ between the two settings of a comparison)."""
    a, b = c["a_setting"], c["b_setting"]
    names, ours, theirs = [], [], []
    if a["bn_policy"] != b["bn_policy"]:
        names.append("BatchNorm policy")
        ours.append(a["bn_policy"])
        theirs.append(b["bn_policy"])
    if a["lr_factor"] != b["lr_factor"]:
        names.append("learning rate")
        ours.append(f"x{a['lr_factor']:g}")
        theirs.append(f"x{b['lr_factor']:g}")
    lo, hi = c["ci95"]
    interval = f"{c['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    ours, theirs = " and ".join(ours), " and ".join(theirs)
    if not c["distinguishable"]:
        said = f"{ours} against {theirs}: not distinguishable ({interval})"
    else:
        said = f"{ours} {'beats' if c['difference'] > 0 else 'trails'} {theirs} by {interval}"
    return f"{' and '.join(names)}: {said}"


def what_the_setting_did(summary: dict) -> list[str]:
    """The winner against its own layers under each other setting: what mattered."""
    compared = summary.get("settings")
    if not compared:
        return []
    lines = ["## What mattered: the winner's layers under each other setting", "",
             f"`{summary['winner']['candidate']}` against the same layers trained otherwise "
             f"(the winner's setting first); {compared[0]['method']}. Validation chose; test "
             f"is for the record.", ""]
    for c in compared:
        pruned = (f"; the other was pruned after {c['b_pruned_after']} epoch(s), compared over "
                  f"seed(s) {', '.join(map(str, c['seeds']))} as they stood"
                  if c.get("b_pruned_after") else "")
        lines.append(f"- {c['split']}: {_setting_words(c)}{pruned}")
    return lines + [""]


def what_each_rung_pruned(summary: dict) -> list[str]:
    """Per pool and rung of a halving search: how many went, on what margin, and how many were
    held for lack of evidence."""
    halving = summary.get("halving")
    if not halving or not halving["decisions"]:
        return []
    lines = ["## What each rung pruned", "",
             "A pool is what competes: a searched strategy's (layers, setting) candidates, or "
             "one baseline candidate's settings. Margin: the leader minus the pruned, on "
             "validation at the rung (paired 95% interval where evidence was required).", ""]
    for pool, rungs in halving["decisions"].items():
        for index, d in sorted(rungs.items(), key=lambda kv: int(kv[0])):
            rung = halving["rungs"][int(index)]
            total = len(d["kept"]) + len(d["pruned"])
            text = (f"- `{pool}`, rung {index} ({rung['epochs']} epochs, {rung['seeds']} "
                    f"seed(s)): {len(d['pruned'])} of {total} pruned")
            if d["pruned"]:
                name, closest = min(d["pruned"].items(), key=lambda kv: kv[1]["difference"])
                interval = (f" [{closest['ci95'][0]:+.3f}, {closest['ci95'][1]:+.3f}]"
                            if "ci95" in closest else "")
                text += (f"; the closest, `{name}`, trailed the leader `{d['leader']}` by "
                         f"{closest['difference']:+.3f}{interval}")
            if d["held"]:
                text += (f"; {len(d['held'])} kept for lack of evidence"
                         + (" (the leader was within chance)" if d["within_chance"] else ""))
            lines.append(text)
    return lines + [""]


def the_rounds(summary: dict) -> list[str]:
    """Per strategy in rounds (SubTuning): each round's leader, the unit it added and the
    gain that decided it."""
    lines = []
    for strategy, entries in summary.get("rounds", {}).items():
        if not entries:
            continue
        lines += [f"## {_label(summary, strategy)}: rounds", "",
                  f"Each round trained {entries[0]['epochs']} epoch(s) with "
                  f"{entries[0]['seeds']} seed(s): the units chosen so far plus one more, each "
                  f"unit not chosen yet; its leader's unit was added while the gain in "
                  f"validation accuracy over the last choice reached epsilon. The chosen "
                  f"candidate then trained every seed to the end.", "",
                  "| round | candidates | leader | leader's validation | gain | unit added |",
                  "|---|---|---|---|---|---|"]
        for e in entries:
            lines.append(f"| {e['round']} | {e['candidates']} | `{e['leader']}` | "
                         f"{e['accuracy'][e['leader']]:.3f} | {e['gain']:+.3f} | "
                         f"{e['added'] or 'none: stop'} |")
        lines += ["", f"Chosen: `{entries[-1]['chosen']}`.", ""]
    return lines


def is_the_winner_better(summary: dict) -> list[str]:
    """The section that says, in words, whether each difference the report shows is real."""
    comparisons = summary.get("comparisons")
    if comparisons is None:
        return ["_No per-example predictions in this workdir: the differences above come without "
                "intervals, and a difference of one validation example may be luck._", ""]
    lines = ["## Is the winner better?", "", f"**{summary['verdict']}**", ""]
    if not comparisons:
        return lines
    lines += [f"Differences in mean accuracy over seeds, the winner minus each other strategy's "
              f"choice; {comparisons[0]['method']}. \"distinguishable\": the interval excludes "
              f"0. Validation chose the winner; test is for the record.", ""]
    for c in comparisons:
        lo, hi = c["ci95"]
        lines.append(f"- `{c['a']}` vs `{c['b']}`: {c['difference']:+.3f} on {c['split']}, "
                     f"95% interval {lo:+.3f} to {hi:+.3f}: "
                     f"{'distinguishable' if c['distinguishable'] else 'not distinguishable'}")
    lines += ["", _what_would_firm_it_up(comparisons), ""]
    return lines


def _what_would_firm_it_up(comparisons: list[dict]) -> str:
    validation = [c for c in comparisons if c["split"] == "validation"] or comparisons
    firmer = [(c, results.firmer_answer(c)) for c in validation]
    widest = max(f["half_width"] for _, f in firmer)
    n, seeds = firmer[0][1]["examples"], firmer[0][1]["seeds"]
    text = (f"What would firm it up: these intervals come from {n} {validation[0]['split']} "
            f"examples and {seeds} seed{'s' if seeds != 1 else ''}, and narrow roughly as "
            f"1/sqrt(examples): about {4 * n:,} examples (4x) would halve them (the widest, "
            f"±{widest:.3f}, to about ±{widest / 2:.3f}).")
    undecided = [f"{c['b']} at about {f['examples_to_exclude_zero']:,} examples"
                 for c, f in firmer if f["examples_to_exclude_zero"] is not None]
    if undecided:
        text += (" If the observed differences held, the interval would exclude 0 against "
                 + ", ".join(undecided) + ".")
    if seeds == 1:
        return text + (" With one seed these intervals leave out training randomness (another "
                       "seed may change the difference): run more seeds (train.seeds).")
    return text + (" More seeds narrow the part that comes from training randomness (how much "
                   f"the difference changes from seed to seed), which {seeds} seeds measure "
                   "only roughly; where that part dominates, more examples alone will not "
                   "halve the interval.")


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    searched = {k: v for k, v in summary["strategies"].items() if k not in BASELINES}
    comparisons = summary.get("comparisons") or []
    columns = max(len(searched), 1)
    rows_per_split = max([sum(c["split"] == s for c in comparisons) for s in results.SPLITS],
                         default=0)
    forest_height = 1.0 + 0.35 * rows_per_split if comparisons else 0.0
    fig = plt.figure(figsize=(max(4 * columns, 9), 3.2 + forest_height), layout="constrained")
    if comparisons:
        top, bottom = fig.subfigures(2, 1, height_ratios=[3.2, forest_height])
        _forest(bottom, comparisons)
    else:
        top = fig
    axes = top.subplots(1, columns, squeeze=False, sharey=True)
    for ax, (strategy, s) in zip(axes[0], searched.items()):
        ranking = sorted(s["ranking"], key=lambda c: c["depth"])
        by_count = bool(REGISTRY[strategy].after)  # top-k: k layers from a ranking
        x = [len(c["layers"]) for c in ranking] if by_count else [c["depth"] for c in ranking]
        ax.errorbar(x, [c["val_accuracy"]["mean"] for c in ranking],
                    yerr=[c["val_accuracy"]["std"] for c in ranking], marker="o",
                    label="validation", capsize=2)
        ax.plot(x, [c["test_accuracy"]["mean"] for c in ranking], "s--", label="test",
                alpha=0.6)
        for base in BASELINES:
            if base in summary["strategies"]:
                ax.axhline(summary["strategies"][base]["selected"]["val_accuracy"]["mean"],
                           linestyle=BASELINE_STYLES[base], color="grey", label=LABELS[base])
        ax.set_xticks(sorted(set(x)))  # depths and k count layers: ticks where candidates are
        ax.set_title(_label(summary, strategy))
        ax.set_xlabel("k (layers)" if by_count else "depth below the output (layers)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    if searched:
        axes[0][0].legend(fontsize=7)
    else:
        axes[0][0].text(0.5, 0.5, "baselines only: see report.md", ha="center",
                        transform=axes[0][0].transAxes)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _forest(fig, comparisons: list[dict]) -> None:
    """One row per comparison: the winner minus the other, with its 95% interval, per split."""
    splits = [s for s in results.SPLITS if any(c["split"] == s for c in comparisons)]
    axes = fig.subplots(1, len(splits), squeeze=False, sharex=True)[0]
    role = {"validation": "chooses", "test": "for the record"}
    fig.suptitle("Is the winner better? Paired differences, 95% intervals "
                 "(filled: the interval excludes 0)", fontsize=10)
    for ax, split in zip(axes, splits):
        rows = [c for c in comparisons if c["split"] == split]
        y = range(len(rows))[::-1]  # first comparison on top
        for yi, c in zip(y, rows):
            lo, hi = c["ci95"]
            color = "C0" if c["distinguishable"] else "grey"
            # A percentile interval need not contain the observed difference: clip at 0.
            ax.errorbar([c["difference"]], [yi], xerr=[[max(c["difference"] - lo, 0)],
                                                       [max(hi - c["difference"], 0)]],
                        fmt="o", color=color, capsize=3,
                        mfc=color if c["distinguishable"] else "white")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(list(y), [f"vs {c['b']}" for c in rows], fontsize=7)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.set_title(f"{split} ({role[split]})", fontsize=9)
        ax.set_xlabel(f"{rows[0]['a']} minus other, accuracy (95% interval)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)


def write(workdir) -> None:
    workdir = Path(workdir)
    summary_path = workdir / "summary.json"
    if not summary_path.exists():
        raise FileNotFoundError(f"{summary_path} not found: run the search first.")
    summary = json.loads(summary_path.read_text())
    write_atomic(workdir / "report.md", markdown(summary) + "\n")
    plot(summary, workdir / "report.png")
