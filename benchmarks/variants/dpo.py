"""`dpo` family: `logp_reduction` x `loss_type`, and sigmoid + `sft_weight`.

Held-out preference accuracy and reward margin (TRL's meanings, summed
log-probs), exact match, and the length drift of greedy replies against the
SFT model on pairs whose rejected reply is longer vs shorter; `sum` at
beta / mean padded length tests whether `legacy_mean_padded` is a rescaled beta.
"""

from __future__ import annotations

import statistics

import lightning as L
import torch

from benchmarks.variants.runner import EVAL_SEED, Bench, brief, fit, length_drift, reply_quality
from llmstages.data import synthetic
from llmstages.model.generate import generate
from llmstages.stages import DPOModule, SFTModule


DPO_VARIANTS = [(loss, red, 0.0) for loss in ("sigmoid", "ipo", "simpo") for red in ("sum", "mean", "legacy_mean_padded")]
DPO_VARIANTS += [("sigmoid", "sum", 1.0)]
DPO_BETA = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0}


@torch.no_grad()
def reply_lengths(backbone, data, prompts: list[list[dict]]) -> list[int]:
    backbone.eval()
    stop = data.template.stop_token_id(data.tokenizer)
    return [len(generate(backbone, data.template.encode_prompt(p, data.tokenizer), 24, stop_id=stop)[0]) for p in prompts]


def sft_start(bench: Bench):
    """The SFT checkpoint every preference run starts from, and its greedy reply lengths on held-out pairs'
    prompts grouped by whether the rejected reply is longer: (groups, sft_path, sft_model, probe, baseline)."""
    pairs = synthetic.preference_pairs(max(8, bench.args.eval), seed=EVAL_SEED)
    groups = {flag: [p["prompt"] for p in pairs if p["rejected_longer"] is flag] for flag in (True, False)}
    sft_path = bench.sft()
    sft_model = SFTModule(preset=bench.args.preset, vocab_size=bench.data("sft").vocab_size, init_from=str(sft_path))
    sft_model.setup("fit")
    probe = bench.data("preference")
    probe.setup("fit")
    baseline = {flag: reply_lengths(sft_model.backbone, probe, prompts) for flag, prompts in groups.items()}
    return groups, sft_path, sft_model, probe, baseline


def run(bench: Bench) -> dict:
    results = {}
    groups, sft_path, sft_model, probe, baseline = sft_start(bench)
    mean_padded = statistics.mean(probe.collate(probe.train_set.items[i:i + 16])["chosen_labels"].shape[1]
                                  for i in range(0, min(len(probe.train_set), 256), 16))
    variants = [(f"{loss}/{red}" + ("+sft" if sft else ""), dict(loss_type=loss, logp_reduction=red, sft_weight=sft,
                 beta=DPO_BETA[loss])) for loss, red, sft in DPO_VARIANTS]
    variants.append(("sigmoid/sum@beta/T", dict(loss_type="sigmoid", logp_reduction="sum", beta=0.1 / mean_padded)))
    for name, options in variants:
        for seed in bench.args.seeds:
            L.seed_everything(seed, verbose=False)
            data = bench.data("preference", seed, batch_size=16)
            module = DPOModule(preset=bench.args.preset, vocab_size=data.vocab_size, init_from=str(sft_path), lr=1e-4,
                               reference="precompute", **({"gamma": 0.5} if options["loss_type"] == "simpo" else {}),
                               **options)
            curve, _ = fit(module, data, bench.steps(150), logger=bench.logger("dpo", name, seed))
            module.train(False)
            val = {k: 0.0 for k in ("rewards/accuracies", "rewards/margins")}
            batches = 0
            for batch in data.val_dataloader():
                _, stats, _ = module.compute_loss(batch)
                for key in val:
                    val[key] += float(stats[key])
                batches += 1
            sft_data = bench.data("sft", seed)
            row = {"pref_accuracy": val["rewards/accuracies"] / batches, "reward_margin": val["rewards/margins"] / batches,
                   "exact_match": reply_quality(module.backbone, sft_data, bench.args.eval)["exact_match"],
                   "drift_rejected_longer": length_drift(reply_lengths(module.backbone, probe, groups[True]), baseline[True]),
                   "drift_rejected_shorter": length_drift(reply_lengths(module.backbone, probe, groups[False]), baseline[False]),
                   "curve": curve}
            results.setdefault(name, []).append(row)
            print(f"dpo {name} seed {seed}: " + brief(row), flush=True)
    results["_meta"] = {"mean_padded_length": mean_padded}
    return results

