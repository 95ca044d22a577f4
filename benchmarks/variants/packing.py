"""`packing` family: SFT `none` vs `documents`, pretraining `documents` vs `concat`.

SFT: exact match, held-out loss on unpacked rows, labelled tokens/s.
Pretraining: held-out loss on document-isolated rows (what cross-document
attention costs). Variants are named `stage:packing` and compared within
their stage against its `documents` default.
"""

from __future__ import annotations

import lightning as L

from benchmarks.variants.runner import Bench, brief, fit, held_out_loss, reply_quality
from llmstages.stages import PretrainModule, SFTModule


def run(bench: Bench) -> dict:
    results = {}
    for variant in ("sft:none", "sft:documents", "pretrain:documents", "pretrain:concat"):
        stage, packing = variant.split(":")
        for seed in bench.args.seeds:
            L.seed_everything(seed, verbose=False)
            if stage == "sft":
                data = bench.data("sft", seed, packing=packing)
                module = SFTModule(preset=bench.args.preset, vocab_size=data.vocab_size,
                                   init_from=str(bench.pretrained()), lr=1e-3, generate_samples=0)
                curve, rate = fit(module, data, bench.steps(200), logger=bench.logger("packing", variant, seed))
                scored = bench.data("sft", seed, packing="none")  # held-out loss on unpacked rows
                scored.setup("validate")
                row = {"val_loss": held_out_loss(module, scored)["loss"], "labelled_tokens_per_s": rate,
                       **reply_quality(module.backbone, scored, bench.args.eval), "curve": curve}
            else:
                data = bench.data("pretrain", seed, packing=packing)
                module = PretrainModule(preset=bench.args.preset, vocab_size=data.vocab_size, lr=3e-3)
                curve, rate = fit(module, data, bench.steps(300), logger=bench.logger("packing", variant, seed))
                scored = bench.data("pretrain", seed, packing="documents")  # every document on its own
                scored.setup("validate")
                row = {"val_loss": held_out_loss(module, scored)["loss"], "labelled_tokens_per_s": rate, "curve": curve}
            results.setdefault(variant, []).append(row)
            print(f"packing {variant} seed {seed}: " + brief(row), flush=True)
    return results

