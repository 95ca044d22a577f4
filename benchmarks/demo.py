"""`llmstages demo` over several seeds: each stage's gain on the held-out prompts, with its spread, and the time.

Design choices:
- Each seed is the demo exactly as a user runs it (`llmstages demo --seed S --scale X`, a child
  process); its numbers come from the `summary.json` the demo writes, so the report and the
  table a user sees are the same measurement (same held-out prompts for every seed, greedy,
  `data.answers.exact_match`).
- Gains are paired per seed (a stage minus the stage it started from, same seed), then
  summarised as mean ± sample std over seeds. A gain counts as shown only when its mean exceeds
  twice that std; otherwise the report says "within noise".
- Time: the child's CPU seconds (`getrusage`), which a loaded machine inflates far less than wall
  time, next to its wall seconds and the load average; the demo's own table has each stage's.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import ROOT, Report, base_parser, load_average, output_dir

GAINS = (  # name, stage, baseline stage, metric
    ("SFT over pretraining: exact match", "sft", "pretrain", "exact_match"),
    ("GRPO over SFT: exact match", "grpo", "sft", "exact_match"),
    ("GRPO over SFT: exact match on GRPO's tasks", "grpo", "sft", "focus"),
    ("DPO over SFT: ranks the right answer above SFT's wrong one", "dpo", "sft", "prefers_right"),
    ("DPO over SFT: exact match", "dpo", "sft", "exact_match"),
    ("DPO over SFT: exact match on GRPO's tasks", "dpo", "sft", "focus"),
    ("GRPO over SFT: ranks the right answer above SFT's wrong one", "grpo", "sft", "prefers_right"),
)
STAGES = ("pretrain", "sft", "reward", "dpo", "grpo")


def start_seed(seed: int, scale: float, folder: Path, threads: int) -> tuple[subprocess.Popen, float]:
    """One `llmstages demo --threads <threads>` in a child process (output to `<folder>.log`)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "COLUMNS": "110"}  # the table unwrapped
    log = open(f"{folder}.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen([sys.executable, "-m", "llmstages", "demo", "--out", str(folder), "--seed", str(seed),
                                "--scale", str(scale), "--threads", str(threads)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, time.perf_counter()


def finish_seed(seed: int, process: subprocess.Popen, started: float, folder: Path) -> dict:
    """Wait for a seed's demo; its summary, wall seconds and the child's own CPU seconds (`wait4`)."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    output = Path(f"{folder}.log").read_text()
    if process.returncode != 0:
        raise SystemExit(f"demo seed {seed} failed (exit {process.returncode}):\n{output[-4000:]}")
    summary = json.loads((folder / "summary.json").read_text())
    summary["process"] = {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "load_after": load_average()}
    title = output.rfind("what each stage learned")
    summary["table"] = output[output.rfind("\n", 0, title) + 1:]
    return summary


def gain(summary: dict, stage: str, base: str, metric: str) -> float:
    """`stage` minus `base` on a held-out metric; NaN where a row lacks it (no held-out mistakes at a tiny scale)."""
    stage_value = summary["stages"][stage]["held_out"].get(metric, float("nan"))
    return stage_value - summary["stages"][base]["held_out"].get(metric, float("nan"))


def pair_counts(runs: dict[int, dict]) -> str:
    return "/".join(str(runs[s].get("held_out_pairs", 0)) for s in sorted(runs))


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(values: list[float]) -> str:
    mean, std = spread(values)
    if len(values) < 2:
        return "one seed: no spread"
    if abs(mean) > 2 * std:
        return "gain" if mean > 0 else "loss"
    return "within noise"


def write(report: Report, runs: dict[int, dict], out: Path) -> None:
    seeds = sorted(runs)
    first = runs[seeds[0]]
    held = first["settings"]["held_out"]
    report.text(
        f"`llmstages demo` at `--scale {first['scale']}`, seeds {', '.join(map(str, seeds))}. Held-out: {held['prompts']} "
        f"prompts of synthetic's `eval` stream (seed {held['seed']}, the same for every seed), greedy, exact match. "
        "Gains are paired per seed (stage minus the stage it started from); *gain* means mean > 2 × std over seeds, "
        f"else *within noise*. One held-out prompt is {1 / held['prompts']:.3f} of exact match; on GRPO's "
        f"{len(first['grpo_tasks'])} tasks ({held['prompts'] * len(first['grpo_tasks']) // 8} prompts) one is "
        f"{8 / (held['prompts'] * len(first['grpo_tasks'])):.3f}."
    )
    rows = []
    for name, stage, base, metric in GAINS:
        values = [gain(runs[s], stage, base, metric) for s in seeds]
        mean, std = spread(values)
        rows.append([name, f"{mean:+.3f} ± {std:.3f}", ", ".join(f"{v:+.3f}" for v in values), verdict(values)])
    for name, values in (
        ("reward model: ranks the right answer above SFT's wrong one (held-out prompts)",
         [runs[s]["stages"]["reward"].get("held_out", {}).get("prefers_right", float("nan")) for s in seeds]),
        ("reward model: pair accuracy on its own validation split",
         [runs[s]["stages"]["reward"]["validation"].get("val/accuracy", float("nan")) for s in seeds]),
    ):
        mean, std = spread(values)
        rows.append([name, f"{mean:.3f} ± {std:.3f}", ", ".join(f"{v:.3f}" for v in values),
                     "above chance (0.5)" if mean - 0.5 > 2 * std else "within noise of chance"])
    report.text("## Each stage's gain")
    report.table(["gain", "mean ± std", "per seed", "verdict"], rows)

    report.text("## Held-out numbers per stage (mean ± std over seeds)")
    report.text(
        f"*Ranks right first*: on the held-out prompts the SFT model answered wrong ({pair_counts(runs)} pairs per "
        "seed), how often the model ranks the right answer above the SFT model's wrong reply: a policy by the "
        "reply's summed log-probability, the reward model by its reward (`tools/mistakes.ranking_accuracy`). "
        "It is the behaviour DPO's pairs (the same construction, on tuning prompts) encode; exact match is the "
        "stricter test of whether it changes what greedy decoding says.")
    stage_rows = []
    for stage in ("pretrain", "sft", "reward", "dpo", "grpo"):
        cells = []
        for metric in ("exact_match", "focus", "stop_rate", "prefers_right"):
            values = [runs[s]["stages"][stage].get("held_out", {}).get(metric) for s in seeds]
            cells.append("" if None in values else "{:.3f} ± {:.3f}".format(*spread(values)))
        stage_rows.append([stage, *cells])
    report.table(["stage", "exact match", "on GRPO's tasks", "stops at end-of-turn", "ranks right first"], stage_rows)
    report.text("GRPO's tasks per seed (the SFT model's weakest on the tuning prompts): "
                + "; ".join(f"seed {s}: {', '.join(runs[s]['grpo_tasks'])} ({runs[s]['mistakes']['pairs']} tuning pairs for the reward model and DPO)"
                            for s in seeds) + ".")

    report.text("## Time (seconds)")
    time_rows = []
    for stage in STAGES:
        cpu = [runs[s]["stages"][stage]["time"]["cpu"] for s in seeds]
        wall = [runs[s]["stages"][stage]["time"]["wall"] for s in seeds]
        time_rows.append([stage, f"{statistics.mean(cpu):.0f}", f"{statistics.mean(wall):.0f}"])
    mistakes = [runs[s]["mistakes"]["time"] for s in seeds]
    time_rows.append(["mistakes step", f"{statistics.mean(m['cpu'] for m in mistakes):.0f}",
                      f"{statistics.mean(m['wall'] for m in mistakes):.0f}"])
    scoring = [sum(row["held_out"]["time"]["cpu"] for row in runs[s]["stages"].values() if "held_out" in row) for s in seeds]
    time_rows.append(["held-out scoring (all models)", f"{statistics.mean(scoring):.0f}", ""])
    cpu_total = [runs[s]["process"]["cpu"] for s in seeds]
    wall_total = [runs[s]["process"]["wall"] for s in seeds]
    time_rows.append(["whole `llmstages demo` process", f"{statistics.mean(cpu_total):.0f} ({min(cpu_total):.0f}–{max(cpu_total):.0f})",
                      f"{statistics.mean(wall_total):.0f} ({min(wall_total):.0f}–{max(wall_total):.0f})"])
    report.table(["part", "CPU s (mean)", "wall s (mean)"], time_rows)
    report.text(
        "CPU seconds are the process's, all torch threads together; on an otherwise idle 2-core machine the wall time "
        "is at most the CPU time (two busy threads make it less), so the CPU total bounds the idle wall time from above. "
        "Wall times here include waiting for the shared cores (load average at the end of each seed: "
        + ", ".join(f"{runs[s]['process']['load_after']}" for s in seeds) + ")."
    )
    report.text("## The closing table of seed " + str(seeds[0]) + "\n\n```\n" + runs[seeds[0]]["table"].strip() + "\n```")
    (out / "demo.json").write_text(json.dumps({str(s): {k: v for k, v in runs[s].items() if k != "table"} for s in seeds},
                                              indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n\n")[0], default_repeats=1)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--scale", type=float, default=1.0, help="the demo's --scale")
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run at once (each demo uses one torch thread; CPU times stay per process)")
    parser.add_argument("--runs", type=Path, default=None, help="where the demo runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.scale = args.seeds[:1], 0.03
    args.threads = args.threads or 1  # each demo's torch threads (the demo's default), and what the report records
    torch.set_num_threads(args.threads)
    out = output_dir(args)
    report = Report("demo", "`llmstages demo`: each stage's effect over seeds", args)
    runs_root = args.runs or Path(tempfile.mkdtemp(prefix="llmstages-demo-"))
    runs, pending = {}, list(args.seeds)
    while pending:
        batch, pending = pending[: args.jobs], pending[args.jobs :]
        started = {seed: start_seed(seed, args.scale, runs_root / f"seed{seed}", args.threads) for seed in batch}
        for seed, (process, t0) in started.items():
            runs[seed] = finish_seed(seed, process, t0, runs_root / f"seed{seed}")
            print(f"seed {seed}: " + ", ".join(f"{st} {runs[seed]['stages'][st]['held_out']['exact_match']:.3f}"
                                               for st in ("pretrain", "sft", "dpo", "grpo"))
                  + f"; {runs[seed]['process']['cpu']:.0f} s CPU, {runs[seed]['process']['wall']:.0f} s wall", flush=True)
    report.text(f"Seeds run {args.jobs} at a time" + (" (wall times overlap)." if args.jobs > 1 else "."))
    write(report, runs, out)
    report.write(out)


if __name__ == "__main__":
    main()
