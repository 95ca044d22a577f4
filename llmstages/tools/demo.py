"""`llmstages demo`: the five stages end to end on the embedded data, on a CPU, each one's effect measured.

Each stage is an ordinary `llmstages fit` run of the YAML in `configs/` (the same path a user
takes; its steps are the config's `trainer.max_steps` times `--scale`), chained by `init_from`:
pretrain -> SFT -> reward model, DPO and GRPO (all three from the SFT checkpoint). After SFT the
demo asks the SFT model tuning prompts (`tools/mistakes.py`): its wrong answers become the
preference pairs the reward model and DPO train on (right answer chosen, its own wrong one
rejected) and its weakest tasks become GRPO's prompts. `configs/demo.yaml` holds those settings
and the held-out prompts'.

Design choices:
- One measurement in every row: the same held-out prompts (synthetic's `eval` stream, which no
  training or tuning data is drawn from), greedy replies, `data.answers.exact_match`
  (`evaluation.evaluate_replies`). Each stage's own validation metrics (its validation split)
  are shown in a separate, labelled column; they are not the held-out numbers.
- A second held-out column for the behaviour DPO's pairs encode: the SFT model's wrong replies to
  the held-out prompts become pairs (`<out>/mistakes/held_out_pairs.jsonl`), and every later row
  says how often it ranks the right answer above that wrong reply (`ranking`: a policy by
  log-probability, the reward model by its reward).
- Every stage's wall time and process CPU time are in the table (CPU time is what a loaded
  machine does not inflate); `<out>/summary.json` keeps everything the table shows, per task
  too, for `benchmarks/demo.py`.
- `--seed` reseeds every stage (seed_everything, data, GRPO's rollouts) and the tuning prompts;
  the held-out prompts stay the same, so seeds are comparable.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llmstages.tools import TOOLS

HELP = TOOLS["demo"].help
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGES = (  # name, config, init_from stage
    ("pretrain", "pretrain.yaml", None),
    ("sft", "sft.yaml", "pretrain"),
    ("reward", "reward.yaml", "sft"),
    ("dpo", "dpo.yaml", "sft"),
    ("grpo", "grpo.yaml", "sft"),
)
SCORED = ("pretrain", "sft", "dpo", "grpo")  # the stages whose policy answers the held-out prompts


class Clock:
    """Wall and process CPU seconds of a block (CPU: every thread of this process)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def seconds(self) -> dict[str, float]:
        return {"wall": self.wall, "cpu": self.cpu}


def answer_quality(model, data, settings: dict, focus: list[str] | None = None) -> tuple[dict, list[dict]]:
    """Exact match and stop rate of greedy replies to the held-out prompts, per task, and on `focus` tasks;
    and the preference pairs the wrong replies make (`mistakes.find_mistakes`, as on the tuning prompts)."""
    from llmstages.data import synthetic
    from llmstages.tools.mistakes import find_mistakes

    items = synthetic.prompt_answer_pairs(settings["prompts"], seed=settings["seed"])
    found = find_mistakes(model, data.tokenizer, data.template, items, settings["max_new_tokens"])
    result = {"exact_match": found.overall(), "stop_rate": found.stop_rate,
              "per_task": {task: [found.correct[task], found.asked[task]] for task in found.asked}}  # task -> [right, asked]
    if focus:
        result["focus"] = focus_accuracy(result, focus)
    return result, found.pairs


def focus_accuracy(result: dict, focus: list[str]) -> float:
    """Exact match over the held-out prompts of the `focus` tasks."""
    right = sum(result["per_task"].get(task, [0, 0])[0] for task in focus)
    return right / max(1, sum(result["per_task"].get(task, [0, 0])[1] for task in focus))


def run_stage(name: str, config: Path, out: Path, init_from: Path | None, steps: int, extra: list[str],
              seed: int = 0, overrides: dict | None = None):
    """`llmstages fit --config <stage>.yaml --config <out>/<stage>/demo.yaml`: the second file
    (written here, kept for you to read) sets the steps, the seed, one validation at the end and
    `trainer.default_root_dir: <out>`, so the run lands in its own folder `<out>/<stage>/<run>/`,
    which becomes `<out>/<stage>/latest`. `overrides` adds `model`/`data` init_args."""
    import yaml

    from llmstages.trainer_cli import lightning_cli

    stage_root = out / name
    stage_root.mkdir(parents=True, exist_ok=True)
    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = steps
    override = {
        "seed_everything": seed,
        "trainer": {
            "max_steps": steps,
            "val_check_interval": steps,  # one validation, at the end: the metrics the table shows
            "num_sanity_val_steps": 0,
            "default_root_dir": str(out),
            "callbacks": callbacks,
        },
        "model": {"init_args": dict((overrides or {}).get("model", {}))},
        "data": {"init_args": {"cache_dir": str(out / "cache"), "seed": seed, **(overrides or {}).get("data", {})}},
    }
    if init_from is not None:
        override["model"]["init_args"]["init_from"] = str(init_from)
    if not override["model"]["init_args"]:
        del override["model"]
    fragment = stage_root / "demo.yaml"
    fragment.write_text(yaml.safe_dump(override, sort_keys=False))
    cli = lightning_cli(["fit", "--config", str(config), "--config", str(fragment), *extra])
    import wandb

    if wandb.run is not None:
        wandb.finish()  # one W&B run per stage; the next stage's logger would otherwise reuse this one
    return cli


def config_steps(config: Path, scale: float) -> int:
    import yaml

    return max(2, int(yaml.safe_load(config.read_text())["trainer"]["max_steps"] * scale))


def demo_settings(scale: float) -> dict:
    """configs/demo.yaml with its prompt counts scaled (at least 16 each)."""
    import yaml

    settings = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    for part in ("held_out", "mistakes", "grpo_tasks"):
        if part != "held_out" or scale < 1:
            settings[part]["prompts"] = max(16, int(settings[part]["prompts"] * min(scale, 1.0)))
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmstages demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where checkpoints, configs and logs go")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every stage's steps and the demo's prompt counts (0.1 for a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every stage and the tuning prompts (held-out prompts stay)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the README's and benchmarks/results/demo*.md's times use 1)")
    parser.add_argument("--stages", nargs="+", default=[s[0] for s in STAGES], choices=[s[0] for s in STAGES])
    args = parser.parse_args(argv)
    if not CONFIGS.is_dir():
        raise SystemExit(f"configs folder not found at {CONFIGS}: run the demo from a checkout of llmstages")
    import torch
    from rich.console import Console

    from llmstages.tools import mistakes

    torch.set_num_threads(args.threads)
    out, console = Path(args.out), Console()
    settings = demo_settings(args.scale)
    summary: dict = {"seed": args.seed, "scale": args.scale, "settings": settings, "stages": {}}
    checkpoints: dict[str, Path] = {}
    held_out_file = out / "mistakes" / "held_out_pairs.jsonl"
    held_out_pairs = []  # the SFT model's wrong held-out replies, as pairs; an earlier run's when SFT is not rerun
    if "sft" not in args.stages and held_out_file.exists():
        held_out_pairs = [json.loads(line) for line in held_out_file.read_text().splitlines()]
    with Clock() as total:
        for name, config, parent in STAGES:
            if name not in args.stages:
                continue
            init_from = checkpoints.get(parent) if parent else None
            if parent and init_from is None:
                init_from = out / parent / "latest" / "checkpoints" / "last.ckpt"  # from an earlier `demo --stages ...`
            if init_from is not None and not init_from.exists():
                raise SystemExit(f"{name} starts from {init_from}, which does not exist: run the {parent} stage first")
            overrides = {}
            if name in ("reward", "dpo", "grpo"):
                overrides = own_mistakes(console, init_from, out, settings, args.seed, summary)[name]
            console.rule(f"[bold]{name}[/]: {CONFIGS / config}")
            with Clock() as clock:
                cli = run_stage(name, CONFIGS / config, out, init_from, config_steps(CONFIGS / config, args.scale), [],
                                seed=args.seed, overrides=overrides)
            checkpoints[name] = Path(cli.trainer.checkpoint_callback.last_model_path)
            row = {"time": clock.seconds(),
                   "validation": {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}}
            with Clock() as scoring:
                if name in SCORED:
                    row["held_out"], pairs = answer_quality(cli.model.backbone, _chat_view(cli.datamodule),
                                                            settings["held_out"], summary.get("grpo_tasks"))
                    if name == "sft":  # the held-out mistakes every later row is ranked on
                        held_out_pairs = pairs
                        mistakes.write_jsonl(held_out_file, pairs)
                if name != "pretrain" and held_out_pairs:
                    row.setdefault("held_out", {})["prefers_right"] = ranking(cli.model, held_out_pairs, cli.datamodule)
            if "held_out" in row:
                row["held_out"]["time"] = scoring.seconds()
            summary["stages"][name] = row
            summary["held_out_pairs"] = len(held_out_pairs)
    summary["time"] = {**total.seconds(), "process_cpu": time.process_time()}  # process_cpu: imports included
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _report(console, summary, out)


def own_mistakes(console, sft_checkpoint: Path, out: Path, settings: dict, seed: int, summary: dict) -> dict:
    """Once per demo: the SFT model's wrong answers on tuning prompts (the reward model's and DPO's pairs
    file) and its weakest tasks (GRPO's prompts file); returns the data overrides of those stages."""
    if "mistakes" in summary:
        return summary["mistakes"]["overrides"]
    from llmstages.data import SFTData, synthetic
    from llmstages.model.checkpoint import load_model
    from llmstages.tools import mistakes

    console.rule("[bold]mistakes[/]: the SFT model answers tuning prompts; wrong answers become preference pairs")
    with Clock() as clock:
        data = SFTData(cache_dir=str(out / "cache"))
        model = load_model(sft_checkpoint).model
        part = settings["mistakes"]
        items = synthetic.tuning_pairs(part["prompts"], seed=part["seed"] + seed)
        found = mistakes.find_mistakes(model, data.tokenizer, data.template, items, settings["held_out"]["max_new_tokens"])
        choice = settings["grpo_tasks"]
        tasks = mistakes.weakest_tasks(found.accuracy(), choice["count"], choice["min_accuracy"])
        if not tasks:
            console.print(f"no task reaches exact match {choice['min_accuracy']} on the tuning prompts: GRPO gets every task")
            tasks = list(found.accuracy())
        pairs = mistakes.write_jsonl(out / "mistakes" / "pairs.jsonl", found.pairs)
        prompts = mistakes.write_jsonl(out / "mistakes" / "grpo_prompts.jsonl",
                                       mistakes.grpo_prompt_records(tasks, settings["grpo_tasks"]["prompts"], seed))
    dpo_data = {"files": [str(pairs)]}
    if len(found.pairs) < 16:  # nearly always right, or (a smoke run) replies empty: nothing to reject
        console.print(f"only {len(found.pairs)} wrong non-empty replies to {len(items)} tuning prompts: "
                      "the reward model and DPO train on the embedded preference pairs instead")
        dpo_data = {}
    console.print(f"SFT exact match on {len(items)} tuning prompts: {found.overall():.1%}; {len(found.pairs)} pairs "
                  f"-> {pairs}; GRPO's tasks (weakest): {', '.join(tasks)} -> {prompts}")
    summary["grpo_tasks"] = tasks
    for row in summary["stages"].values():  # the stages scored before the tasks were chosen
        if "per_task" in row.get("held_out", {}):
            row["held_out"]["focus"] = focus_accuracy(row["held_out"], tasks)
    summary["mistakes"] = {
        "time": clock.seconds(), "tuning_exact_match": found.overall(), "tuning_per_task": found.accuracy(),
        "pairs": len(found.pairs), "tasks": tasks,
        "overrides": {"reward": {"data": dpo_data}, "dpo": {"data": dpo_data},
                      "grpo": {"data": {"files": [str(prompts)]}, "model": {"rollout_seed": seed}}},
    }
    return summary["mistakes"]["overrides"]


def ranking(module, pairs: list[dict], data) -> float:
    """How often `module` ranks the right answer above the SFT model's wrong one on the held-out mistakes:
    a policy by the reply's log-probability, the reward model by its reward (`mistakes.ranking_accuracy`)."""
    from llmstages.tools import mistakes

    module.eval()
    if hasattr(module, "rewards"):
        score = lambda ids, labels: module.rewards(ids.to(module.device), labels.to(module.device))  # noqa: E731
    else:
        score = mistakes.policy_logps(module.backbone)
    return mistakes.ranking_accuracy(score, pairs, data.tokenizer, data.template)


def _chat_view(data):
    """Pretraining data has no template; borrow the SFT defaults to ask it the same questions."""
    if hasattr(data, "template"):
        return data
    from llmstages.data.chat import ChatTemplate

    class View:
        tokenizer, template = data.tokenizer, ChatTemplate.get("chatml")

    return View


VALIDATION_KEYS = {  # the stage's own validation metrics the table shows, with short labels
    "pretrain": {"val/loss": "loss", "val/token_acc": "token acc"},
    "sft": {"val/loss": "loss", "val/exact_match": "exact"},
    "reward": {"val/accuracy": "pair acc"},
    "dpo": {"val/rewards/accuracies": "pair acc"},
    "grpo": {"val/exact_match": "exact"},
}


def _report(console, summary: dict, out: Path) -> None:
    from rich.table import Table

    held = summary["settings"]["held_out"]
    tasks = summary.get("grpo_tasks")
    table = Table(title="what each stage learned")
    for column in ("stage", "wall s", "CPU s", "exact match", "GRPO's tasks", "stops", "right > SFT's wrong",
                   "own validation split"):
        table.add_column(column)
    for stage, row in summary["stages"].items():
        q = row.get("held_out", {})
        shown = ", ".join(f"{label} {row['validation'][k]:.2f}" for k, label in VALIDATION_KEYS[stage].items()
                          if k in row["validation"])
        cells = [f"{q[key]:{form}}" if key in q else "" for key, form in
                 (("exact_match", ".1%"), ("focus", ".1%"), ("stop_rate", ".0%"), ("prefers_right", ".1%"))]
        table.add_row(stage, f"{row['time']['wall']:.0f}", f"{row['time']['cpu']:.0f}", *cells, shown)
        if stage == "sft" and "mistakes" in summary:
            m = summary["mistakes"]
            table.add_row("mistakes", f"{m['time']['wall']:.0f}", f"{m['time']['cpu']:.0f}", "", "", "", "",
                          f"tuning exact {m['tuning_exact_match']:.2f}, {m['pairs']} pairs")
    console.print(table)
    pairs = summary.get("held_out_pairs")
    console.print(f"exact match, GRPO's tasks, stops: greedy replies to the same {held['prompts']} held-out prompts "
                  "(synthetic's eval stream: no stage trained or tuned on them), exact match as data.answers.exact_match; "
                  + (f"GRPO's tasks = {', '.join(tasks)}, the SFT model's weakest on the tuning prompts. " if tasks else "")
                  + (f"right > SFT's wrong: on the {pairs} held-out prompts the SFT model answered wrong, how often the "
                     "model ranks the right answer above SFT's wrong reply (a policy by log-probability, the reward "
                     "model by reward): the behaviour DPO's pairs encode. " if pairs else "")
                  + "Own validation split: each stage's validation metrics on its own data, not the held-out prompts.")
    t = summary["time"]
    console.print(f"done in {t['wall'] / 60:.1f} min wall, {t['process_cpu'] / 60:.1f} min CPU; each stage's run "
                  f"(checkpoints, config, logs) under {out}/<stage>/latest/, the numbers in {out}/summary.json")


if __name__ == "__main__":
    main()
