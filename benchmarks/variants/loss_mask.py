"""`loss_mask` family: all six masks, scored on one yardstick.

Each variant trains SFT from the same pretrained checkpoint; every one is then
scored on the `assistant` mask (the same yardstick for all): held-out
first-reply-token accuracy, reply-token accuracy (teacher-forced), exact match
under greedy decoding and stop rate within a 24-token budget.
"""

from __future__ import annotations

import lightning as L

from benchmarks.variants.runner import Bench, brief, fit, held_out_loss, reply_quality
from llmstages.options import LossMask, choices
from llmstages.stages import SFTModule


def run(bench: Bench) -> dict:
    results = {}
    for variant in choices(LossMask):
        for seed in bench.args.seeds:
            L.seed_everything(seed, verbose=False)
            data = bench.data("sft", seed, loss_mask=variant)
            module = SFTModule(preset=bench.args.preset, vocab_size=data.vocab_size, init_from=str(bench.pretrained()),
                               lr=1e-3, generate_samples=0)
            curve, _ = fit(module, data, bench.steps(200), logger=bench.logger("loss_mask", variant, seed))
            scored = bench.data("sft", seed, loss_mask="assistant")  # the same yardstick for every variant
            scored.setup("validate")
            row = {**reply_quality(module.backbone, scored, bench.args.eval),
                   "reply_token_acc": held_out_loss(module, scored)["token_acc"], "curve": curve}
            results.setdefault(variant, []).append(row)
            print(f"loss_mask {variant} seed {seed}: " + brief(row), flush=True)
    return results

