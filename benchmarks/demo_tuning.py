"""The demo's DPO and GRPO settings, chosen on a tuning split: candidates from the demo's own SFT model.

Design choices:
- Per seed, the demo's pretrain and SFT stages and its mistakes step run as `llmstages demo`
  runs them (`tools.demo.main --stages pretrain sft`, then `tools.demo.own_mistakes`), so every
  candidate starts where the demo's DPO and GRPO start, on the same pairs and GRPO prompts.
- A candidate is `configs/<stage>.yaml` plus command-line overrides, run by the demo's own
  `run_stage`; the first candidate of each stage is the shipped config unchanged.
- Scored on tuning prompts: synthetic's `tuning` stream at seed 999 (not the mistakes step's
  prompts, seed 777 + the demo seed, and never the `eval` stream the demo reports on), greedy,
  `data.answers.exact_match`, overall and on the tasks the mistakes step gave GRPO.
- Mean over seeds, and the gain over the same seed's SFT model; the report ranks nothing for
  you: it shows every candidate so the choice in the configs can be checked.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import Report, base_parser, output_dir

TUNING_PROMPTS, TUNING_SEED = 512, 999
CANDIDATES = {  # stage -> (name, command-line overrides, steps or None for the config's)
    "dpo": (
        ("shipped config", [], None),
        ("lr 3e-4", ["--model.init_args.lr=3e-4"], None),
        ("lr 1e-3", ["--model.init_args.lr=1e-3"], None),
        ("lr 1e-3, no SFT term", ["--model.init_args.lr=1e-3", "--model.init_args.sft_weight=0.0"], None),
        ("beta 0.01", ["--model.init_args.beta=0.01"], None),
        ("loss ipo", ["--model.init_args.loss_type=ipo"], None),
        ("lr 3e-5, 300 steps", ["--model.init_args.lr=3e-5"], 300),
    ),
    "grpo": (
        ("shipped config", [], None),
        ("lr 2e-4", ["--model.init_args.lr=2e-4"], None),
        ("lr 3e-4", ["--model.init_args.lr=3e-4"], None),
        ("temperature 0.7", ["--model.init_args.temperature=0.7"], None),
        ("temperature 1.0", ["--model.init_args.temperature=1.0"], None),
        ("150 steps", [], 150),
        ("16 prompts a step", ["--data.init_args.batch_size=16"], None),
        ("group size 16", ["--model.init_args.group_size=16"], None),
    ),
}


def tuning_score(model, data, tasks: list[str]) -> dict:
    """Greedy exact match on the tuning prompts, overall and on `tasks`."""
    from llmstages.data import synthetic
    from llmstages.tools.mistakes import find_mistakes

    found = find_mistakes(model, data.tokenizer, data.template, synthetic.tuning_pairs(TUNING_PROMPTS, seed=TUNING_SEED))
    accuracy = found.accuracy()
    return {"exact_match": found.overall(), "focus": statistics.mean(accuracy[t] for t in tasks)}


def run_seed(seed: int, root: Path, scale: float) -> dict:
    """The demo's SFT model and mistakes for `seed`, then every candidate; scores keyed by stage and name."""
    from rich.console import Console

    from llmstages.data import SFTData
    from llmstages.model.checkpoint import load_model
    from llmstages.tools import demo

    out = root / f"seed{seed}"
    demo.main(["--out", str(out), "--seed", str(seed), "--stages", "pretrain", "sft", "--threads", "1",
               "--scale", str(scale)])
    sft = out / "sft" / "latest" / "checkpoints" / "last.ckpt"
    summary: dict = {"stages": {}}
    overrides = demo.own_mistakes(Console(), sft, out, demo.demo_settings(scale), seed, summary)
    tasks = summary["grpo_tasks"]
    data = SFTData(cache_dir=str(out / "cache"))
    scores = {"tasks": tasks, "sft": tuning_score(load_model(sft).model, data, tasks)}
    for stage, candidates in CANDIDATES.items():
        config = demo.CONFIGS / f"{stage}.yaml"
        for i, (name, extra, steps) in enumerate(candidates):
            steps = max(2, int(steps * scale)) if steps else demo.config_steps(config, scale)
            cli = demo.run_stage(stage, config, out / f"{stage}-{i}", sft, steps, extra,
                                 seed=seed, overrides=overrides[stage])
            scores.setdefault(stage, {})[name] = tuning_score(cli.model.backbone, data, tasks)
            print(f"seed {seed} {stage} {name}: {scores[stage][name]}", flush=True)
    return scores


def write(report: Report, runs: dict[int, dict]) -> None:
    seeds = sorted(runs)
    report.text(
        f"Seeds {', '.join(map(str, seeds))}. Each seed: the demo's pretrain and SFT stages and mistakes step, then "
        f"every candidate from that SFT model on its pairs / GRPO prompts. Scored on {TUNING_PROMPTS} tuning prompts "
        f"(synthetic's `tuning` stream, seed {TUNING_SEED}; the demo reports on the `eval` stream), greedy exact match. "
        "*Shipped config*: `configs/<stage>.yaml` as committed at the commit below. "
        "*Gain*: minus the same seed's SFT model. *On GRPO's tasks*: the tasks the mistakes step chose (per seed: "
        + "; ".join(f"{s}: {', '.join(runs[s]['tasks'])}" for s in seeds) + ")."
    )
    sft = [runs[s]["sft"]["exact_match"] for s in seeds]
    report.text(f"SFT models: exact match {' / '.join(f'{v:.3f}' for v in sft)} (mean {statistics.mean(sft):.3f}).")
    for stage, candidates in CANDIDATES.items():
        report.text(f"## {stage}")
        rows = []
        for name, extra, steps in candidates:
            em = [runs[s][stage][name]["exact_match"] for s in seeds]
            gain = [runs[s][stage][name]["exact_match"] - runs[s]["sft"]["exact_match"] for s in seeds]
            focus = [runs[s][stage][name]["focus"] - runs[s]["sft"]["focus"] for s in seeds]
            rows.append([name, " ".join([*extra, *([f"max_steps {steps}"] if steps else [])]) or "-",
                         " / ".join(f"{v:.3f}" for v in em), f"{statistics.mean(gain):+.3f}",
                         " / ".join(f"{v:+.3f}" for v in gain), f"{statistics.mean(focus):+.3f}"])
        report.table(["candidate", "overrides", "exact match per seed", "gain (mean)", "gain per seed",
                      "gain on GRPO's tasks (mean)"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n\n")[0], default_repeats=1)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    scale = 0.03 if args.quick else 1.0  # --quick: a smoke run of the whole path, one seed, into a temp folder
    if args.quick:
        args.seeds = args.seeds[:1]
    args.threads = args.threads or 1
    torch.set_num_threads(args.threads)
    out = output_dir(args)
    report = Report("demo_tuning", "The demo's DPO and GRPO settings on the tuning split", args)
    root = args.runs or Path(tempfile.mkdtemp(prefix="llmstages-demo-tuning-"))
    runs = {seed: run_seed(seed, root, scale) for seed in args.seeds}
    write(report, runs)
    report.write(out)


if __name__ == "__main__":
    main()
