"""Compare GRPO loss aggregations (TRL's `loss_type`) on the embedded tasks, from one SFT checkpoint.

Every run starts from the same SFT checkpoint, with the same prompts, steps and seed; only
`loss_aggregation` differs (dapo, dr_grpo, grpo, bnpo; see `llmstages.losses`). Each optimiser
step samples `group_size` completions per prompt and rewards exact matches. Recorded per step:
the mean reward, the mean completion length, and the mean length of completions with a negative
advantage (wrong answers when the reward is exact match): the length bias the Dr. GRPO paper
attributes to `grpo`'s per-completion mean would show as wrong completions growing longer under
`grpo` than under `dr_grpo`/`dapo`. After training, held-out prompts (the evaluation stream,
disjoint from training) are answered greedily and scored on exact match and stop rate.

    python benchmarks/grpo_aggregation.py                          # 4 aggregations x 3 seeds
    python benchmarks/grpo_aggregation.py --steps 5 --seeds 0      # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from llmstages.data import PromptData, SFTData, synthetic
from llmstages.evaluation import evaluate_replies
from llmstages.losses import LOSS_AGGREGATIONS, target_mask
from llmstages.stages import GRPOModule, SFTModule

RESULTS = Path(__file__).parent / "results"


def _trainer(steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
        callbacks=list(callbacks),
    )


def sft_checkpoint(cache: Path, steps: int, preset: str) -> Path:
    path = cache / f"grpo-bench-sft-{preset}-{steps}.ckpt"
    if path.exists():
        return path
    L.seed_everything(0, verbose=False)
    data = SFTData(cache_dir=str(cache), batch_size=16, seq_len=128, val_fraction=0.0)
    model = SFTModule(preset=preset, vocab_size=data.vocab_size, lr=2e-3, warmup_steps=10, generate_samples=0)
    trainer = _trainer(steps)
    trainer.fit(model, data)
    trainer.save_checkpoint(path)
    return path


def held_out(model, data: PromptData, n: int, budget: int) -> dict[str, float]:
    items = synthetic.prompt_answer_pairs(n, seed=4242)
    prompts = [data.template.encode_prompt(messages, data.tokenizer) for messages, _, _ in items]
    quality = evaluate_replies(model, prompts, [a for _, a, _ in items], data.stop_token_id, data.tokenizer, budget)
    return {k: quality[k] for k in ("exact_match", "stop_rate")}


class Curves(L.Callback):
    """Per optimiser step: mean reward, mean completion length, mean length of negative-advantage completions."""

    def __init__(self) -> None:
        self.reward, self.length, self.negative_length = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch["micro_index"] != 0 or batch["iteration"] != 0:
            return
        rollout = pl_module._rollout
        self.reward.append(rollout.stats["reward"])
        self.length.append(rollout.stats["completion_length"])
        lengths, advantages = [], []
        for part in rollout.micro_batches:
            lengths.append(target_mask(part.rows["labels"]).sum(1).double().cpu())
            advantages.append(part.advantages.double().cpu())
        lengths, advantages = torch.cat(lengths), torch.cat(advantages)
        negative = lengths[advantages < 0]
        self.negative_length.append(float(negative.mean()) if negative.numel() else float("nan"))


def run(aggregation: str, seed: int, init: Path, cache: Path, args) -> dict:
    L.seed_everything(seed, verbose=False)
    data = PromptData(cache_dir=str(cache), batch_size=args.prompts, seed=seed, max_prompt_len=96, val_fraction=0.0)
    model = GRPOModule(
        preset=args.preset, vocab_size=data.vocab_size, init_from=str(init), lr=args.lr, warmup_steps=3,
        group_size=args.group_size, max_completion_length=args.max_completion_length, loss_aggregation=aggregation,
        rollout_seed=seed,
    )
    curves = Curves()
    started = time.perf_counter()
    _trainer(args.steps, [curves]).fit(model, data)
    seconds = time.perf_counter() - started
    scores = held_out(model.backbone, data, args.eval, args.max_completion_length)
    return {"seconds": seconds, **scores, "reward": curves.reward, "length": curves.length,
            "negative_length": curves.negative_length}


def _tail(values: list[float], k: int) -> float:
    finite = [v for v in values[-k:] if v == v]
    return statistics.fmean(finite) if finite else float("nan")


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def report(results: dict[str, list[dict]], before: dict[str, float], args) -> str:
    k = max(1, args.steps // 4)
    lines = [
        "# GRPO loss aggregations (TRL 1.16 meanings)",
        "",
        f"Same SFT checkpoint ({args.init or f'{args.sft_steps} SFT steps'}, preset `{args.preset}`), {args.steps} GRPO steps of "
        f"{args.prompts} prompts x {args.group_size} completions (max {args.max_completion_length} tokens), "
        f"lr {args.lr}, reward exact_match, seeds {args.seeds}. Held-out: {args.eval} prompts of the evaluation "
        f"stream, greedy. Median [min, max] over seeds; curve columns average the last {k} steps.",
        "",
        f"Before GRPO (the SFT checkpoint): exact match {before['exact_match']:.3f}, stop rate {before['stop_rate']:.3f}.",
        "",
        "| aggregation | held-out exact match | stop rate | reward (last steps) | length (first steps) | "
        "length (last steps) | wrong-answer length (first) | wrong-answer length (last) | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        first_len = [statistics.fmean(r["length"][:k]) for r in runs]
        first_neg = [_tail(r["negative_length"][:k], k) for r in runs]
        lines.append(
            f"| `{name}` | {_spread([r['exact_match'] for r in runs])} | {_spread([r['stop_rate'] for r in runs])} | "
            f"{_spread([_tail(r['reward'], k) for r in runs])} | {_spread(first_len)} | "
            f"{_spread([_tail(r['length'], k) for r in runs])} | {_spread(first_neg)} | "
            f"{_spread([_tail(r['negative_length'], k) for r in runs])} | "
            f"{statistics.median(r['seconds'] for r in runs):.0f} |"
        )
    lines += ["", "Reward and completion-length curves (mean over seeds, every step):", ""]
    for name, runs in results.items():
        steps = min(len(r["reward"]) for r in runs)
        reward = [statistics.fmean(r["reward"][i] for r in runs) for i in range(steps)]
        length = [statistics.fmean(r["length"][i] for r in runs) for i in range(steps)]
        lines.append(f"- `{name}` reward: " + " ".join(f"{v:.2f}" for v in reward))
        lines.append(f"- `{name}` length: " + " ".join(f"{v:.1f}" for v in length))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aggregations", nargs="+", default=list(LOSS_AGGREGATIONS), choices=LOSS_AGGREGATIONS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sft-steps", type=int, default=250)
    parser.add_argument("--init", default=None, help="an SFT checkpoint to start from (default: train one, --sft-steps)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per optimiser step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=12)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval", type=int, default=96, help="held-out prompts per run")
    parser.add_argument("--cache", default=".cache/benchmarks")
    parser.add_argument("--out", default=str(RESULTS / "grpo_aggregation.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    init = Path(args.init) if args.init else sft_checkpoint(cache, args.sft_steps, args.preset)
    sft = SFTModule.load_from_checkpoint(init, map_location="cpu")
    probe = PromptData(cache_dir=str(cache), batch_size=1, val_fraction=0.0)
    before = held_out(sft.backbone, probe, args.eval, args.max_completion_length)
    results: dict[str, list[dict]] = {}
    for aggregation in args.aggregations:
        for seed in args.seeds:
            result = run(aggregation, seed, init, cache, args)
            results.setdefault(aggregation, []).append(result)
            print(f"{aggregation} seed {seed}: exact match {result['exact_match']:.3f}, {result['seconds']:.0f}s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results, before, args))
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "before": before, "results": results}, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
