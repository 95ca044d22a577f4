"""Compare SFT loss-mask variants on the embedded tasks: what each one costs.

Every variant fine-tunes the same pretrained checkpoint for the same steps
with the same seed; only `loss_mask` differs. Held-out prompts (disjoint
from training) are answered greedily and scored on:

- first-token accuracy: the first generated token is the reference reply's
  first token (what `legacy_drop_first`, the OpenRLHF #973 bug, never trains);
- stop rate: generation ends with the end-of-turn token within the budget
  (what `assistant_no_eos` never trains);
- exact match: the reply is right and stops.

Each variant runs with several seeds; the report gives the median and the
spread, and the ratio to the `assistant` default from the same run.

    python benchmarks/masking_variants.py                 # ~10 min on 2 CPU cores
    python benchmarks/masking_variants.py --steps 60 --seeds 0   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from llmstages.data import synthetic
from llmstages.data import PretrainData, SFTData
from llmstages.data.templates import LOSS_MASKS
from llmstages.evaluation import evaluate_replies
from llmstages.stages import PretrainModule, SFTModule

RESULTS = Path(__file__).parent / "results"


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )


def pretrain(cache: Path, steps: int, preset: str) -> Path:
    path = cache / f"pretrain-{preset}-{steps}.ckpt"
    if path.exists():
        return path
    L.seed_everything(0, verbose=False)
    data = PretrainData(cache_dir=str(cache), batch_size=16, seq_len=128)
    model = PretrainModule(preset=preset, vocab_size=data.vocab_size, lr=3e-3)
    trainer = _trainer(steps)
    trainer.fit(model, data)
    trainer.save_checkpoint(path)
    return path


def score(model, data: SFTData, n: int) -> dict[str, float]:
    items = synthetic.prompt_answer_pairs(n, seed=4242)
    prompts = [data.template.encode_prompt(messages, data.tokenizer) for messages, _, _ in items]
    answers = [answer for _, answer, _ in items]
    ref_ids = [data.template.encode_reply(answer, data.tokenizer)["input_ids"] for answer in answers]
    quality = evaluate_replies(model, prompts, answers, data.stop_token_id, data.tokenizer, 24, reference_ids=ref_ids)
    return {k: quality[k] for k in ("first_token_acc", "stop_rate", "exact_match")}


def run_variant(variant: str, seed: int, init: Path, cache: Path, steps: int, preset: str, n_eval: int) -> dict:
    L.seed_everything(seed, verbose=False)
    data = SFTData(cache_dir=str(cache), batch_size=8, seq_len=256, loss_mask=variant, seed=seed)
    model = SFTModule(preset=preset, vocab_size=data.vocab_size, init_from=str(init), lr=1e-3, generate_samples=0)
    started = time.perf_counter()
    _trainer(steps).fit(model, data)
    return {"seconds": time.perf_counter() - started, **score(model.backbone, data, n_eval)}


def report(results: dict[str, list[dict]], args) -> str:
    metrics = ("first_token_acc", "stop_rate", "exact_match")
    base = {m: statistics.median(r[m] for r in results["assistant"]) for m in metrics} if "assistant" in results else {}
    lines = [
        "# SFT loss-mask variants",
        "",
        f"`python benchmarks/masking_variants.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}` "
        f"(preset `{args.preset}`, {args.eval} held-out prompts, pretrain {args.pretrain_steps} steps). "
        "Median over seeds, [min, max] in brackets; ratio = median / median of `assistant` in the same run.",
        "",
        "| loss_mask | first-token acc | stop rate | exact match | exact-match ratio |",
        "|---|---|---|---|---|",
    ]
    for variant, runs in results.items():
        cells = []
        for m in metrics:
            values = [r[m] for r in runs]
            cells.append(f"{statistics.median(values):.1%} [{min(values):.0%}, {max(values):.0%}]")
        ratio = statistics.median(r["exact_match"] for r in runs) / base["exact_match"] if base.get("exact_match") else float("nan")
        lines.append(f"| `{variant}` | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(LOSS_MASKS), choices=LOSS_MASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--eval", type=int, default=96, help="held-out prompts per run")
    parser.add_argument("--cache", default=".cache/benchmarks")
    parser.add_argument("--out", default=str(RESULTS / "masking_variants.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    cache = Path(args.cache)
    init = pretrain(cache, args.pretrain_steps, args.preset)
    results: dict[str, list[dict]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            result = run_variant(variant, seed, init, cache, args.steps, args.preset, args.eval)
            results.setdefault(variant, []).append(result)
            print(f"{variant:20s} seed {seed}: " + ", ".join(f"{k}={v:.3f}" for k, v in result.items()), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results, args))
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(out.read_text())


if __name__ == "__main__":
    main()
