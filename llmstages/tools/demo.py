"""`llmstages demo`: the five stages end to end on the embedded data, on a CPU.

Each stage is an ordinary `llmstages fit` run of the YAML in `configs/`
(the same path a user takes), chained by `init_from`: pretrain -> SFT ->
reward model, DPO and GRPO (all three from the SFT checkpoint). At the end
it prints what each stage learned, measured on held-out prompts with
checkable answers: exact-match accuracy and how often greedy generation
stops at the end-of-turn token, before SFT, after SFT, after DPO and after
GRPO, plus the reward model's pairwise accuracy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmstages.tools import TOOLS

HELP = TOOLS["demo"].help
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGES = (  # name, config, init_from stage, default steps
    ("pretrain", "pretrain.yaml", None, 400),
    ("sft", "sft.yaml", "pretrain", 300),
    ("reward", "reward.yaml", "sft", 150),
    ("dpo", "dpo.yaml", "sft", 150),
    ("grpo", "grpo.yaml", "sft", 30),
)


def answer_quality(model, data, n: int = 64, seed: int = 12345) -> dict[str, float]:
    """Exact-match accuracy and stop rate of greedy replies to held-out task prompts."""
    from llmstages.data import synthetic
    from llmstages.evaluation import evaluate_replies

    items = synthetic.prompt_answer_pairs(n, seed=seed)
    prompts = [data.template.encode_prompt(messages, data.tokenizer) for messages, _, _ in items]
    quality = evaluate_replies(model, prompts, [answer for _, answer, _ in items],
                               data.template.stop_token_id(data.tokenizer), data.tokenizer, max_new_tokens=24)
    return {"exact_match": quality["exact_match"], "stop_rate": quality["stop_rate"]}


def run_stage(name: str, config: Path, out: Path, init_from: Path | None, steps: int, extra: list[str]):
    """`llmstages fit --config <stage>.yaml --config <out>/<stage>/demo.yaml`: the second file
    (written here, kept for you to read) sets the steps and `trainer.default_root_dir: <out>`, so
    the run lands in its own folder `<out>/<stage>/<run>/`, which becomes `<out>/<stage>/latest`."""
    import yaml

    from llmstages.trainer_cli import lightning_cli

    stage_root = out / name
    stage_root.mkdir(parents=True, exist_ok=True)
    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    for callback in callbacks:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = steps
    override = {
        "trainer": {
            "max_steps": steps,
            "val_check_interval": max(1, steps // 2),
            "default_root_dir": str(out),
            "callbacks": callbacks,
        },
        "data": {"init_args": {"cache_dir": str(out / "cache")}},
    }
    if init_from is not None:
        override["model"] = {"init_args": {"init_from": str(init_from)}}
    fragment = stage_root / "demo.yaml"
    fragment.write_text(yaml.safe_dump(override, sort_keys=False))
    cli = lightning_cli(["fit", "--config", str(config), "--config", str(fragment), *extra])
    import wandb

    if wandb.run is not None:
        wandb.finish()  # one W&B run per stage; the next stage's logger would otherwise reuse this one
    return cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmstages demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where checkpoints, configs and logs go")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (0.1 for a smoke run)")
    parser.add_argument("--stages", nargs="+", default=[s[0] for s in STAGES], choices=[s[0] for s in STAGES])
    args = parser.parse_args(argv)
    if not CONFIGS.is_dir():
        raise SystemExit(f"configs folder not found at {CONFIGS}: run the demo from a checkout of llmstages")
    from rich.console import Console

    out = Path(args.out)
    console = Console()
    results, quality, checkpoints, started = {}, {}, {}, time.time()
    for name, config, parent, steps in STAGES:
        if name not in args.stages:
            continue
        init_from = checkpoints.get(parent) if parent else None
        if parent and init_from is None:
            init_from = out / parent / "latest" / "checkpoints" / "last.ckpt"  # from an earlier `demo --stages ...`
        if init_from is not None and not init_from.exists():
            raise SystemExit(f"{name} starts from {init_from}, which does not exist: run the {parent} stage first")
        console.rule(f"[bold]{name}[/]: {CONFIGS / config}")
        cli = run_stage(name, CONFIGS / config, out, init_from, max(2, int(steps * args.scale)), [])
        checkpoints[name] = Path(cli.trainer.checkpoint_callback.last_model_path)
        results[name] = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
        if name in ("pretrain", "sft", "dpo", "grpo"):
            quality[name] = answer_quality(cli.model.backbone, _chat_view(cli.datamodule))
    _report(console, results, quality, time.time() - started, out)


def _chat_view(data):
    """Pretraining data has no template; borrow the SFT defaults to ask it the same questions."""
    if hasattr(data, "template"):
        return data
    from llmstages.data.chat import ChatTemplate

    class View:
        tokenizer, template = data.tokenizer, ChatTemplate.get("chatml")

    return View


def _report(console, results: dict, quality: dict, seconds: float, out: Path) -> None:
    from rich.table import Table

    table = Table(title="what each stage learned (held-out prompts)")
    for column in ("stage", "validation metrics", "exact match", "stops at end-of-turn"):
        table.add_column(column)
    keys = {
        "pretrain": ("val/loss", "val/token_acc"),
        "sft": ("val/loss", "val/first_reply_token_acc", "val/stop_rate"),
        "reward": ("val/accuracy", "val/margin"),
        "dpo": ("val/rewards/accuracies", "val/rewards/margins"),
        "grpo": ("val/exact_match", "val/stop_rate"),
    }
    for stage, metrics in results.items():
        shown = ", ".join(f"{k[4:]}={metrics[k]:.3f}" for k in keys[stage] if k in metrics)
        q = quality.get(stage)
        table.add_row(stage, shown, f"{q['exact_match']:.1%}" if q else "", f"{q['stop_rate']:.1%}" if q else "")
    console.print(table)
    console.print(f"done in {seconds / 60:.1f} min; each stage's run (checkpoints, config, logs) under {out}/<stage>/latest/")


if __name__ == "__main__":
    main()
