"""The family reports: a summary sentence that says only what the seeds separate, tables, plots, JSON.

`rebuild_report` rewrites a report and its plots from its JSON, keeping the
original run's provenance (for wording changes; the numbers stay the run's).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import Report, command_line, git_commit
from benchmarks.variants.runner import mean_std

HEADLINE = {"loss_mask": "exact_match", "normalize": "grad_rel_error", "packing": "val_loss", "dpo": "exact_match",
            "grpo": "exact_match", "alignment": "exact_match"}


def summary_sentence(family: str, results: dict) -> str:
    """What the numbers show on the family's headline metric, and nothing they do not: which variants
    differ from the default by more than twice their seeds' combined spread. Variants named `stage:value`
    (the packing family) are compared within their stage only, against that stage's `documents` default."""
    names = [v for v in results if not v.startswith("_")]
    groups: dict[str, list[str]] = {}
    for v in names:
        groups.setdefault(v.split(":")[0] if ":" in v else "", []).append(v)
    sentences = []
    for prefix, members in groups.items():
        default = f"{prefix}:documents" if f"{prefix}:documents" in members else members[0]
        sentences.append(compare(family, {v: results[v] for v in [default, *(m for m in members if m != default)]}))
    text = " ".join(sentences)
    if family == "dpo" and "sigmoid/legacy_mean_padded" in results and "sigmoid/sum@beta/T" in results:
        a, b = (statistics.mean(r["pref_accuracy"] for r in results[k]) for k in ("sigmoid/legacy_mean_padded", "sigmoid/sum@beta/T"))
        c = statistics.mean(r["pref_accuracy"] for r in results["sigmoid/sum"])
        text += (f" `legacy_mean_padded` reaches preference accuracy {a:.3f}, `sum` at beta/T̄ {b:.3f} and `sum` at beta "
                 f"{c:.3f}: |legacy - rescaled| {'<' if abs(a - b) < abs(a - c) else '>='} |legacy - sum|.")
    if family == "alignment" and "_meta" in results:
        text += (f" The SFT checkpoint's greedy replies average {results['_meta']['sft_reply_length']:.2f} tokens; "
                 "`reply_length` is each method's, `drift_*` its change on pairs whose rejected reply is longer / shorter.")
    if family == "grpo" and "_meta" in results:
        before = results["_meta"]["before"]["exact_match"]
        drift = {v: statistics.mean(r["wrong_length_last"] - r["wrong_length_first"] for r in results[v])
                 for v in names if all("wrong_length_last" in r for r in results[v])}
        text = (f"Before GRPO the SFT checkpoint scores exact match {before:.3f}. " + text + " Wrong answers' length, "
                "last quarter minus first quarter of the run (tokens; the length bias the Dr. GRPO paper attributes "
                "to `grpo` would show as a larger rise there): " + ", ".join(f"`{v}` {d:+.2f}" for v, d in drift.items()) + ".")
    return text


# How a headline metric is read. `grad_rel_error` is a distance from the full-batch token-mean gradient,
# which `token` computes by construction: a larger value means "further from token's gradient", not "worse".
METRIC_WORDS = {
    "grad_rel_error": ("relative distance from the full-batch token-mean gradient (what `token` computes by "
                       "construction; it measures how far a variant's step is from `token`'s, not training quality)",
                       "further from it", "closer to it"),
}


def compare(family: str, results: dict) -> str:
    """One group's sentence; the first variant is the default."""
    metric = HEADLINE[family]
    stats = {}
    for v, runs in results.items():
        values = [r[metric] for r in runs if metric in r] if not v.startswith("_") else []
        if values:
            stats[v] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    default = next(iter(stats))
    lower_is_better = metric in ("grad_rel_error", "val_loss")
    meaning, worse_word, better_word = METRIC_WORDS.get(metric, ("", "worse", "better"))
    mean_d, std_d = stats[default]
    better, worse = [], []
    for v, (mean, std) in stats.items():
        if v != default and abs(mean - mean_d) > 2 * (std + std_d):
            (better if (mean < mean_d) == lower_is_better else worse).append(f"`{v}` ({mean:.3f})")
    seeds = len(bench_seeds(results))
    plural = "s" if seeds != 1 else ""
    if meaning:
        text = f"On `{metric}`, the {meaning} ({seeds} seed{plural}), the default `{default}` scores {mean_d:.3f} ± {std_d:.3f}; "
    else:
        text = (f"On `{metric}` ({'lower' if lower_is_better else 'higher'} is better; {seeds} seed{plural}), "
                f"the default `{default}` scores {mean_d:.3f} ± {std_d:.3f}; ")
    text += f"clearly {worse_word}: {', '.join(worse)}; " if worse else f"no variant is clearly {worse_word}; "
    text += f"clearly {better_word}: {', '.join(better)}" if better else f"none is clearly {better_word}"
    text += " (clearly: the means differ by more than twice the summed seed standard deviations; the rest are within noise)."
    return text


def bench_seeds(results: dict) -> list:
    return next(runs for v, runs in results.items() if not v.startswith("_"))


def rebuild_report(family: str, out: Path) -> None:
    """Rewrite `<out>/<family>.md` and its plots from its JSON, keeping the original run's provenance."""
    results = json.loads((out / f"{family}.json").read_text())
    old = (out / f"{family}.md").read_text()
    provenance = old[old.index("## Run"):].rstrip("\n").split("\n- rebuilt from")[0]
    provenance += (f"\n- rebuilt from {family}.json (text and plots only; the numbers are the run's) by "
                   f"`{command_line()}` at commit {git_commit()}\n")
    seeds = [str(s) for s in range(len(bench_seeds(results)))]
    body = report_body(family, results, seeds, out)
    (out / f"{family}.md").write_text(f"# Variant family: `{family}`\n\n" + body + "\n" + provenance)


def report_body(family: str, results: dict, seeds: list[str], out: Path) -> str:
    report = Report(family, "", argparse.Namespace(quick=False, repeats=1, warmup=0))
    fill(report, family, results, seeds, out)
    return "\n".join(report.parts)


def write_report(family: str, results: dict, args, out: Path, report: Report) -> None:
    fill(report, family, results, [str(s) for s in args.seeds], out)
    report.write(out)
    (out / f"{family}.json").write_text(json.dumps(results, indent=1))


def fill(report: Report, family: str, results: dict, seeds: list[str], out: Path) -> None:
    variants = [v for v in results if not v.startswith("_")]
    metrics = list(dict.fromkeys(k for v in variants for k, x in results[v][0].items() if isinstance(x, float)))

    def cell(v: str, m: str, fmt: Callable[[list[float]], str]) -> str:
        values = [r[m] for r in results[v] if m in r]
        return fmt(values) if values else "–"

    report.text(summary_sentence(family, results))
    report.text("Mean ± standard deviation over seeds:")
    report.table(["variant", *metrics], [[f"`{v}`", *(cell(v, m, mean_std) for m in metrics)] for v in variants])
    report.text("Every seed (seeds " + ", ".join(seeds) + "):")
    per_seed = lambda values: " / ".join(f"{x:.3f}" for x in values)  # noqa: E731
    report.table(["variant", *metrics], [[f"`{v}`", *(cell(v, m, per_seed) for m in metrics)] for v in variants])
    for png in plot(family, results, metrics, out):
        report.text(f"![{png.stem}]({png.name})")


def plot(family: str, results: dict, metrics: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in results if not v.startswith("_")]
    paths = []
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, v in enumerate(variants):
            values = [r[metric] for r in results[v] if metric in r]
            if not values:
                continue
            ax.bar(i, statistics.mean(values), color="#9ecae1")
            ax.scatter([i] * len(values), values, color="#08519c", s=12, zorder=3)  # every seed
        ax.set_xticks(range(len(variants)), variants, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    fig.tight_layout()
    paths.append(out / f"{family}_metrics.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    for key, label in CURVES.get(family, CURVES["default"]):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for v in variants:
            curves = [r[key] for r in results[v] if r.get(key)]
            if not curves:
                continue
            n = min(map(len, curves))
            stacked = torch.tensor([c[:n] for c in curves])
            mean, low, high = stacked.mean(0), stacked.min(0).values, stacked.max(0).values
            ax.plot(mean, label=v, linewidth=1)
            ax.fill_between(range(n), low, high, alpha=0.2)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(f"{label} (mean, min-max over seeds)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        paths.append(out / f"{family}_{key.replace('curve', 'curves')}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# the curves each family plots: (row key, y-axis label)
CURVES = {"default": [("curve", "train/loss")],
          "grpo": [("curve", "mean reward of the step's rollouts"), ("length_curve", "mean completion length (tokens)")]}

