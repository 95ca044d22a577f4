"""`alignment` family: DPO (sigmoid), IPO, SimPO, ORPO and KTO from one SFT checkpoint.

Every method trains on the same preference data (KTO on it unpaired: one desirable and one
undesirable example per pair, twice the batch so the pairs per step stay equal), from the same
SFT checkpoint and learning rate, each with its stage's defaults. The dpo family's metrics are
computed alike for every method (preference accuracy and reward margin of beta 0.1 times the summed
policy - SFT log-probs, on held-out pairs), plus exact match and the mean greedy reply length.
"""

from __future__ import annotations

import statistics

import lightning as L
import torch

from benchmarks.variants.dpo import DPO_BETA, reply_lengths, sft_start
from benchmarks.variants.runner import Bench, brief, fit, length_drift, reply_quality
from llmstages.stages import DPOModule, KTOModule, ORPOModule

# (name, stage, its options)
METHODS = [
    ("dpo", DPOModule, {"loss_type": "sigmoid", "beta": 0.1, "reference": "precompute"}),
    ("ipo", DPOModule, {"loss_type": "ipo", "beta": DPO_BETA["ipo"], "reference": "precompute"}),
    ("simpo", DPOModule, {"loss_type": "simpo", "beta": DPO_BETA["simpo"], "gamma": 0.5}),
    ("orpo", ORPOModule, {"beta": 0.1}),
    ("kto", KTOModule, {"beta": 0.1}),
]


@torch.no_grad()
def implicit_preference(policy, reference, data, beta: float = 0.1) -> dict[str, float]:
    """Held-out preference accuracy and margin of beta * (summed policy - reference log-probs), for any method."""
    scorer = DPOModule(preset="tiny", vocab_size=data.vocab_size, logp_reduction="sum")  # only its pair_logps
    correct = margin = pairs = 0.0
    for batch in data.val_dataloader():
        pc, pr, _ = scorer.pair_logps(batch, model=policy)
        rc, rr, _ = scorer.pair_logps(batch, model=reference)
        diff = beta * ((pc - rc) - (pr - rr))
        correct, margin, pairs = correct + float((diff > 0).sum()), margin + float(diff.sum()), pairs + len(diff)
    return {"pref_accuracy": correct / max(pairs, 1), "reward_margin": margin / max(pairs, 1)}


def run(bench: Bench) -> dict:
    results = {}
    groups, sft_path, sft_model, probe, baseline = sft_start(bench)
    for name, stage, options in METHODS:
        for seed in bench.args.seeds:
            L.seed_everything(seed, verbose=False)
            data = bench.data("kto", seed, batch_size=32) if stage is KTOModule else bench.data("preference", seed, batch_size=16)
            module = stage(preset=bench.args.preset, vocab_size=data.vocab_size, init_from=str(sft_path), lr=1e-4, **options)
            curve, _ = fit(module, data, bench.steps(150), logger=bench.logger("alignment", name, seed))
            module.train(False)
            held_out = bench.data("preference", seed, batch_size=16)
            held_out.setup("fit")
            lengths = {flag: reply_lengths(module.backbone, probe, groups[flag]) for flag in (True, False)}
            row = {**implicit_preference(module.backbone, sft_model.backbone, held_out),
                   "exact_match": reply_quality(module.backbone, bench.data("sft", seed), bench.args.eval)["exact_match"],
                   "drift_rejected_longer": length_drift(lengths[True], baseline[True]),
                   "drift_rejected_shorter": length_drift(lengths[False], baseline[False]),
                   "reply_length": float(statistics.mean(lengths[True] + lengths[False])),
                   "curve": curve}
            results.setdefault(name, []).append(row)
            print(f"alignment {name} seed {seed}: " + brief(row), flush=True)
    results["_meta"] = {"sft_reply_length": statistics.mean(baseline[True] + baseline[False])}
    return results
