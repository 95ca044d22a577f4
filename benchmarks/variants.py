"""What each masking, normalisation, packing and DPO reduction choice does, family by family.

Every run of a family starts from the same checkpoint, trains the same steps
on the same data with several seeds, and only the family's option differs:

- `loss_mask` (all six): held-out first-reply-token accuracy, reply-token
  accuracy (teacher-forced, on the `assistant` mask for every variant), exact
  match under greedy decoding and stop rate within a 24-token budget.
- `normalize` (token, micro_batch, sequence, sum): for one optimiser step of 4
  accumulated micro-batches of very different lengths, the cosine and the
  relative norm error of each variant's gradient against the full-batch
  token-mean gradient, in one process (`grad_*`) and split over 2 gloo
  processes of 2 micro-batches each with gradients averaged as DDP does
  (`ddp_grad_*`), and the effective per-token weight of the shortest and
  longest example (the length bias); then validation loss and exact match
  after training with that accumulation.
- `packing`: SFT `none` vs `documents` (exact match, held-out loss on
  unpacked rows, labelled tokens/s) and pretraining `documents` vs `concat`
  (held-out loss on document-isolated rows: what cross-document attention costs).
- `dpo` (`logp_reduction` x `loss_type`, and sigmoid + `sft_weight`): held-out
  preference accuracy and reward margin (TRL's meanings, summed log-probs),
  exact match, and the length drift of greedy replies against the SFT model
  on pairs whose rejected reply is longer vs shorter; `sum` at beta / mean
  padded length tests whether `legacy_mean_padded` is a rescaled beta.
- `alignment`: DPO (sigmoid), IPO, SimPO, ORPO and KTO from one SFT checkpoint on the same
  preference data (KTO on it unpaired), each with its stage's defaults: the dpo family's metrics
  (preference accuracy and reward margin computed alike for every method: beta 0.1 times summed
  policy - SFT log-probs, on held-out pairs) plus the mean greedy reply length.

    python benchmarks/variants.py                     # every family, 3 seeds
    python benchmarks/variants.py --families dpo      # one family
    python benchmarks/variants.py --quick             # smoke run into a temp folder
    python benchmarks/variants.py --families loss_mask --sft-data ../shared/data/llamafactory/alpaca_en_demo.json

Reports: `<out>/<family>.md` with PNG plots beside them and a JSON of every
value; runs are grouped in offline W&B by family (`group`) and variant
(`job_type`), in `<cache>/wandb` (never beside the committed reports); `--no-wandb` turns it off,
`wandb sync <cache>/wandb/offline-run-*` uploads them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, base_parser, output_dir  # noqa: E402

from llmstages.callbacks import batch_tokens  # noqa: E402
from llmstages.data import KTOData, PreferenceData, PretrainData, PromptData, SFTData, synthetic  # noqa: E402
from llmstages.evaluation import evaluate_replies  # noqa: E402
from llmstages.losses import count_sequences, count_targets, reduce_token_loss, target_mask  # noqa: E402
from llmstages.model.generate import generate  # noqa: E402
from llmstages.options import LossAggregation, LossMask, Normalize, choices  # noqa: E402
from llmstages.stages import DPOModule, GRPOModule, KTOModule, ORPOModule, PretrainModule, SFTModule  # noqa: E402

FAMILIES = ("loss_mask", "normalize", "packing", "dpo", "grpo", "alignment")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
EVAL_SEED = 4242  # held-out prompts: synthetic's `eval` stream, which no training set draws from


# --------------------------------------------------------------------------- metrics (tested in tests/test_variants.py)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def relative_error(a: torch.Tensor, reference: torch.Tensor) -> float:
    """||a - reference|| / ||reference||."""
    return float((a.double() - reference.double()).norm() / reference.double().norm())


def length_drift(lengths: list[int], baseline: list[int]) -> float:
    """Mean reply length relative to the baseline model's on the same prompts (1.0: unchanged)."""
    if not lengths or len(lengths) != len(baseline):
        raise ValueError("length_drift needs equally many replies from both models")
    return statistics.mean(lengths) / max(statistics.mean(baseline), 1e-9)


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


# --------------------------------------------------------------------------- runs


class StepLosses(L.Callback):
    """`train/loss` after every optimiser step (the curve), and labelled tokens over time in the batches."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.labelled, self.seconds = 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self._start
        if "prompt_ids" not in batch:  # GRPO's prompt batches carry no labels (RolloutCurves measures them)
            self.labelled += batch_tokens(batch)[1]
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and "train/loss" in trainer.callback_metrics:
            self.losses.append(float(trainer.callback_metrics["train/loss"]))


def fit(module, data, steps: int, accumulate: int = 1, logger=None, callbacks=(), **trainer_args) -> tuple[list[float], float]:
    """Train; returns the loss curve and labelled (trained) tokens per second of training step."""
    curve = StepLosses()
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, accumulate_grad_batches=accumulate, logger=logger or False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[curve, *callbacks], **trainer_args,
    )
    trainer.fit(module, data)
    if logger is not None:
        import wandb

        wandb.finish()  # one W&B run per training run
    return curve.losses, curve.labelled / max(curve.seconds, 1e-9)


@torch.no_grad()
def held_out_loss(module, data) -> dict[str, float]:
    """Token-weighted validation loss and token accuracy (teacher-forced) on `data`'s validation split."""
    module.eval()
    total = {"loss": 0.0, "token_acc": 0.0}
    weight = 0
    for batch in data.val_dataloader():
        _, stats, n = module.compute_loss(batch)
        for key in total:
            total[key] += float(stats[key]) * int(n)
        weight += int(n)
    module.train()
    return {key: value / max(weight, 1) for key, value in total.items()}


def reply_quality(backbone, data, n: int) -> dict[str, float]:
    items = synthetic.prompt_answer_pairs(n, seed=EVAL_SEED)
    prompts = [data.template.encode_prompt(m, data.tokenizer) for m, _, _ in items]
    answers = [a for _, a, _ in items]
    ref_ids = [data.template.encode_reply(a, data.tokenizer)["input_ids"] for a in answers]
    quality = evaluate_replies(backbone, prompts, answers, data.template.stop_token_id(data.tokenizer),
                               data.tokenizer, 24, reference_ids=ref_ids)
    return {k: quality[k] for k in ("first_token_acc", "stop_rate", "exact_match")}


class Bench:
    """Shared checkpoints and settings of one benchmark run."""

    def __init__(self, args, out: Path) -> None:
        self.args, self.out = args, out
        self.cache = Path(args.cache)
        self.cache.mkdir(parents=True, exist_ok=True)

    def data(self, kind: str, seed: int = 0, **kwargs):
        cls = {"pretrain": PretrainData, "sft": SFTData, "preference": PreferenceData, "kto": KTOData}[kind]
        kwargs.setdefault("batch_size", 8 if kind != "pretrain" else 16)
        kwargs.setdefault("seq_len", 256 if kind == "sft" else 128)
        files = {"sft": self.args.sft_data, "preference": self.args.pref_data, "kto": self.args.pref_data}.get(kind)
        if files:
            kwargs.setdefault("files", [str(f) for f in files])
        return cls(cache_dir=str(self.cache), seed=seed, **kwargs)

    def logger(self, family: str, variant: str, seed: int):
        if not self.args.wandb:
            return None
        from llmstages.loggers import WandbAutoLogger

        return WandbAutoLogger(project="llmstages-variants", name=f"{family}-{variant}-s{seed}", group=family,
                               job_type=variant, save_dir=str(self.cache), offline=True)  # W&B adds wandb/

    def checkpoint(self, name: str, build: Callable[[], tuple[object, object, int]]) -> Path:
        given = [*(self.args.sft_data or []), *(self.args.pref_data or [])]
        tag = "-" + hashlib.sha1("\n".join(map(str, given)).encode()).hexdigest()[:8] if given else ""
        path = self.cache / f"{name}-{self.args.preset}-{self.args.scale}{tag}.ckpt"  # one per data choice
        if not path.exists():
            L.seed_everything(0, verbose=False)
            module, data, steps = build()
            fit(module, data, steps)
            torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
        return path

    def pretrained(self) -> Path:
        def build():
            data = self.data("pretrain")
            return PretrainModule(preset=self.args.preset, vocab_size=data.vocab_size, lr=3e-3), data, self.steps(400)

        return self.checkpoint("pretrain", build)

    def sft(self) -> Path:
        def build():
            data = self.data("sft")
            module = SFTModule(preset=self.args.preset, vocab_size=data.vocab_size, init_from=str(self.pretrained()),
                               lr=1e-3, generate_samples=0)
            return module, data, self.steps(300)

        return self.checkpoint("sft", build)

    def short_sft(self, steps: int) -> Path:
        def build():
            data = self.data("sft")
            module = SFTModule(preset=self.args.preset, vocab_size=data.vocab_size, init_from=str(self.pretrained()),
                               lr=1e-3, generate_samples=0)
            return module, data, self.steps(steps)

        return self.checkpoint(f"sft{steps}", build)

    def steps(self, n: int) -> int:
        return max(4, int(n * self.args.scale))


# --------------------------------------------------------------------------- families


def family_loss_mask(bench: Bench) -> dict:
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
            print(f"loss_mask {variant} seed {seed}: " + _short(row), flush=True)
    return results


def _length_mixed_step(data: SFTData, per_micro: int = 2, micro_batches: int = 4) -> list[dict]:
    """One step's micro-batches with very different lengths: the shortest and longest examples, sorted."""
    data.setup("fit")
    examples = sorted(data.train_set.items, key=lambda e: len(e["input_ids"]))
    half = per_micro * micro_batches // 2
    chosen = examples[:half] + examples[-half:]
    return [data._collate(chosen[i * per_micro:(i + 1) * per_micro]) for i in range(micro_batches)]


def _counts(micro: list[dict]) -> tuple[int, int]:
    """Target tokens and sequences of the given micro-batches."""
    return sum(count_targets(b["labels"]) for b in micro), sum(count_sequences(b["labels"]) for b in micro)


def _accumulate(module, micro: list[dict], normalize: str, counts: tuple[int, int], grad_scale: float) -> None:
    """Backward over `micro` as the stage does it: loss(step counts, grad_scale) / accumulation steps (Lightning)."""
    for batch in micro:
        logps = module.target_logps(batch["input_ids"], batch["labels"], batch["position_ids"])
        loss = reduce_token_loss(-logps, batch["labels"], normalize=normalize, num_step_tokens=counts[0],
                                 num_step_sequences=counts[1], grad_scale=grad_scale)
        (loss / len(micro)).backward()


def _step_gradient(module, micro: list[dict], normalize: str) -> torch.Tensor:
    """The optimiser step's gradient in one process accumulating `micro` (grad_scale = accumulation steps)."""
    module.zero_grad(set_to_none=True)
    _accumulate(module, micro, normalize, _counts(micro), grad_scale=len(micro))
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def _ddp_worker(rank: int, world: int, rendezvous: str, build: dict, micro: list[dict], normalize: str, out: str) -> None:
    """One of `world` gloo processes: this rank's share of the step's micro-batches, with the step's counts
    summed over ranks (as the stage does), then gradients averaged over ranks (as DDP does)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        module = SFTModule(**build)
        module.setup("fit")
        module.zero_grad(set_to_none=True)
        mine = micro[rank::world]
        counts = torch.tensor(_counts(mine), dtype=torch.float64)
        dist.all_reduce(counts)
        _accumulate(module, mine, normalize, (int(counts[0]), int(counts[1])), grad_scale=len(mine) * world)
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world
        if rank == 0:
            torch.save(torch.cat([g.flatten() for g in grads]), out)
    finally:
        dist.destroy_process_group()


def _ddp_step_gradient(build: dict, micro: list[dict], normalize: str, world: int = 2) -> torch.Tensor:
    """The step's gradient from `world` real CPU processes (gloo), each accumulating its share of `micro`."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="llmstages-ddp-") as tmp:
        out = f"{tmp}/grad.pt"
        mp.spawn(_ddp_worker, args=(world, f"{tmp}/rendezvous", build, micro, normalize, out), nprocs=world)
        return torch.load(out)


def _token_weights(micro: list[dict], normalize: str) -> tuple[float, float]:
    """d loss / d token-NLL of one token of the shortest and of the longest example, relative to `token`'s 1/N."""
    tokens, sequences = _counts(micro)
    weights = []
    for batch in micro:
        nll = torch.zeros(batch["labels"].shape, dtype=torch.float64, requires_grad=True)
        loss = reduce_token_loss(nll, batch["labels"], normalize=normalize, num_step_tokens=tokens,
                                 num_step_sequences=sequences, grad_scale=len(micro)) / len(micro)
        (grad,) = torch.autograd.grad(loss, nll)
        for row in range(len(grad)):
            row_weights = grad[row][grad[row] != 0]
            weights.append((count_targets(batch["labels"][row:row + 1]), float(row_weights[0]) * tokens))
    weights.sort()
    return weights[0][1], weights[-1][1]


def family_normalize(bench: Bench) -> dict:
    results, accumulate = {}, 4
    for variant in choices(Normalize):
        for seed in bench.args.seeds:
            L.seed_everything(seed, verbose=False)
            data = bench.data("sft", seed, packing="none", batch_size=2, shuffle=False)
            build = dict(preset=bench.args.preset, vocab_size=data.vocab_size, init_from=str(bench.pretrained()),
                         normalize=variant, lr=1e-3, generate_samples=0)
            module = SFTModule(**build)
            module.setup("fit")
            micro = _length_mixed_step(data)
            reference = _step_gradient(module, [_merge(micro)], "token")
            gradient = _step_gradient(module, micro, variant)
            ddp = _ddp_step_gradient(build, micro, variant)
            short, long = _token_weights(micro, variant)
            curve, _ = fit(module, data, bench.steps(150), accumulate=accumulate,
                           logger=bench.logger("normalize", variant, seed))
            scored = bench.data("sft", seed)
            scored.setup("validate")
            row = {"grad_cosine": cosine(gradient, reference), "grad_rel_error": relative_error(gradient, reference),
                   "ddp_grad_cosine": cosine(ddp, reference), "ddp_grad_rel_error": relative_error(ddp, reference),
                   "weight_short": short, "weight_long": long, "val_loss": held_out_loss(module, scored)["loss"],
                   **reply_quality(module.backbone, scored, bench.args.eval), "curve": curve}
            results.setdefault(variant, []).append(row)
            print(f"normalize {variant} seed {seed}: " + _short(row), flush=True)
    return results


def _merge(micro: list[dict]) -> dict:
    """The step's micro-batches as one right-padded batch (the full-batch reference)."""
    length = max(b["input_ids"].shape[1] for b in micro)
    pad = lambda t, value: torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)  # noqa: E731
    return {
        "input_ids": torch.cat([pad(b["input_ids"], 0) for b in micro]),
        "labels": torch.cat([pad(b["labels"], -100) for b in micro]),
        "position_ids": torch.arange(length).expand(sum(len(b["input_ids"]) for b in micro), length),
    }


def family_packing(bench: Bench) -> dict:
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
            print(f"packing {variant} seed {seed}: " + _short(row), flush=True)
    return results


# GRPO runs: exact-match reward, from a short SFT run (held-out exact match ~0.1: room to improve; from the
# demo's 0.65 it does not move within 100 steps). Temperature 0.5: measured on this model, 120 steps, seeds 0-2,
# held-out exact match 0.125 -> 0.21/0.17/0.14 at 0.5, 0.20/0.14/0.13 at 0.7, 0.14 at 1.0 (seed 0); at 1.0 the
# sampled answers are too far from the greedy ones for greedy accuracy to follow the reward.
# 16 prompts per step in 4 accumulated micro-batches: with one micro-batch bnpo would be dapo exactly.
GRPO = {"sft_steps": 100, "steps": 120, "prompts": 16, "accumulate": 4, "group_size": 8, "max_completion_length": 16,
        "temperature": 0.5, "lr": 1e-4}

DPO_VARIANTS = [(loss, red, 0.0) for loss in ("sigmoid", "ipo", "simpo") for red in ("sum", "mean", "legacy_mean_padded")]
DPO_VARIANTS += [("sigmoid", "sum", 1.0)]
DPO_BETA = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0}


@torch.no_grad()
def reply_lengths(backbone, data, prompts: list[list[dict]]) -> list[int]:
    backbone.eval()
    stop = data.template.stop_token_id(data.tokenizer)
    return [len(generate(backbone, data.template.encode_prompt(p, data.tokenizer), 24, stop_id=stop)[0]) for p in prompts]


def family_dpo(bench: Bench) -> dict:
    results = {}
    pairs = synthetic.preference_pairs(max(8, bench.args.eval), seed=EVAL_SEED)
    groups = {flag: [p["prompt"] for p in pairs if p["rejected_longer"] is flag] for flag in (True, False)}
    sft_path = bench.sft()
    sft_model = SFTModule(preset=bench.args.preset, vocab_size=bench.data("sft").vocab_size, init_from=str(sft_path))
    sft_model.setup("fit")
    probe = bench.data("preference")
    probe.setup("fit")
    baseline = {flag: reply_lengths(sft_model.backbone, probe, prompts) for flag, prompts in groups.items()}
    mean_padded = statistics.mean(probe._collate(probe.train_set.items[i:i + 16])["chosen_labels"].shape[1]
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
            print(f"dpo {name} seed {seed}: " + _short(row), flush=True)
    results["_meta"] = {"mean_padded_length": mean_padded}
    return results


# the alignment family: (name, stage, its options); every method from the same SFT checkpoint and lr
ALIGNMENT = [
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


def family_alignment(bench: Bench) -> dict:
    results = {}
    pairs = synthetic.preference_pairs(max(8, bench.args.eval), seed=EVAL_SEED)
    groups = {flag: [p["prompt"] for p in pairs if p["rejected_longer"] is flag] for flag in (True, False)}
    sft_path = bench.sft()
    sft_model = SFTModule(preset=bench.args.preset, vocab_size=bench.data("sft").vocab_size, init_from=str(sft_path))
    sft_model.setup("fit")
    sft_model.backbone.eval()
    probe = bench.data("preference")
    probe.setup("fit")
    baseline = {flag: reply_lengths(sft_model.backbone, probe, prompts) for flag, prompts in groups.items()}
    for name, stage, options in ALIGNMENT:
        for seed in bench.args.seeds:
            L.seed_everything(seed, verbose=False)
            # KTO sees each pair as two examples: twice the batch keeps the pairs per step equal
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
            print(f"alignment {name} seed {seed}: " + _short(row), flush=True)
    results["_meta"] = {"sft_reply_length": statistics.mean(baseline[True] + baseline[False])}
    return results


class RolloutCurves(L.Callback):
    """Per optimiser step of GRPO: mean reward, mean completion length, mean length of the completions
    with a negative advantage (the wrong answers, under exact match)."""

    def __init__(self) -> None:
        self.reward, self.length, self.negative_length = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch["micro_index"] != 0 or batch["iteration"] != 0:
            return
        rollout = pl_module._rollout
        self.reward.append(rollout.stats["reward"])
        self.length.append(rollout.stats["completion_length"])
        lengths = torch.cat([target_mask(part.rows["labels"]).sum(1).double() for part in rollout.micro_batches])
        advantages = torch.cat([part.advantages.double().cpu() for part in rollout.micro_batches])
        negative = lengths[advantages < 0]
        self.negative_length.append(float(negative.mean()) if negative.numel() else float("nan"))


def _mean_of(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.fmean(finite) if finite else float("nan")


def family_grpo(bench: Bench) -> dict:
    """Every aggregation from one SFT checkpoint, on the same prompts and rollout seeds."""
    results = {}
    sft_path = bench.short_sft(GRPO["sft_steps"])
    scored = bench.data("sft")
    sft_model = SFTModule(preset=bench.args.preset, vocab_size=scored.vocab_size, init_from=str(sft_path))
    sft_model.setup("fit")
    before = reply_quality(sft_model.backbone, scored, bench.args.eval)
    steps = bench.steps(GRPO["steps"])
    k = max(1, steps // 4)  # first / last quarter of the run
    for aggregation in choices(LossAggregation):
        for seed in bench.args.seeds:
            L.seed_everything(seed, verbose=False)
            data = PromptData(cache_dir=str(bench.cache), batch_size=GRPO["prompts"] // GRPO["accumulate"], seed=seed,
                              max_prompt_len=96, val_fraction=0.0)
            module = GRPOModule(preset=bench.args.preset, vocab_size=data.vocab_size, init_from=str(sft_path),
                                lr=GRPO["lr"], warmup_steps=3, group_size=GRPO["group_size"],
                                max_completion_length=GRPO["max_completion_length"], temperature=GRPO["temperature"],
                                loss_aggregation=aggregation, rollout_seed=seed)
            rollouts = RolloutCurves()
            fit(module, data, steps, accumulate=GRPO["accumulate"], logger=bench.logger("grpo", aggregation, seed),
                callbacks=[rollouts], gradient_clip_val=1.0)
            quality = reply_quality(module.backbone, scored, bench.args.eval)
            row = {"exact_match": quality["exact_match"], "exact_match_gain": quality["exact_match"] - before["exact_match"],
                   "stop_rate": quality["stop_rate"], "reward_first": _mean_of(rollouts.reward[:k]),
                   "reward_last": _mean_of(rollouts.reward[-k:]), "length_first": _mean_of(rollouts.length[:k]),
                   "length_last": _mean_of(rollouts.length[-k:]),
                   "wrong_length_first": _mean_of(rollouts.negative_length[:k]),
                   "wrong_length_last": _mean_of(rollouts.negative_length[-k:]),
                   "curve": rollouts.reward, "length_curve": rollouts.length}
            results.setdefault(aggregation, []).append(row)
            print(f"grpo {aggregation} seed {seed}: " + _short(row), flush=True)
    results["_meta"] = {"before": before, "settings": {**GRPO, "steps": steps}}
    return results


def _short(row: dict) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float))


# --------------------------------------------------------------------------- reports and plots

HEADLINE = {"loss_mask": "exact_match", "normalize": "grad_rel_error", "packing": "val_loss", "dpo": "exact_match",
            "grpo": "exact_match", "alignment": "exact_match"}


def summary_sentence(family: str, results: dict) -> str:
    """What the numbers show on the family's headline metric, and nothing they do not: which variants
    differ from the default by more than twice their seeds' combined spread. Variants named `stage:value`
    (the packing family) are compared within their stage only, against that stage's `documents` default."""
    names = [v for v in results if not v.startswith("_")]
    groups: dict[str, list[str]] = {}
    for v in names:
        groups.setdefault(v.split(":")[0] if ":" in v else "", []).append(v)
    sentences = []
    for prefix, members in groups.items():
        default = f"{prefix}:documents" if f"{prefix}:documents" in members else members[0]
        sentences.append(_compare(family, {v: results[v] for v in [default, *(m for m in members if m != default)]}))
    text = " ".join(sentences)
    if family == "dpo" and "sigmoid/legacy_mean_padded" in results and "sigmoid/sum@beta/T" in results:
        a, b = (statistics.mean(r["pref_accuracy"] for r in results[k]) for k in ("sigmoid/legacy_mean_padded", "sigmoid/sum@beta/T"))
        c = statistics.mean(r["pref_accuracy"] for r in results["sigmoid/sum"])
        text += (f" `legacy_mean_padded` reaches preference accuracy {a:.3f}, `sum` at beta/T̄ {b:.3f} and `sum` at beta "
                 f"{c:.3f}: |legacy - rescaled| {'<' if abs(a - b) < abs(a - c) else '>='} |legacy - sum|.")
    if family == "alignment" and "_meta" in results:
        text += (f" The SFT checkpoint's greedy replies average {results['_meta']['sft_reply_length']:.2f} tokens; "
                 "`reply_length` is each method's, `drift_*` its change on pairs whose rejected reply is longer / shorter.")
    if family == "grpo" and "_meta" in results:
        before = results["_meta"]["before"]["exact_match"]
        drift = {v: statistics.mean(r["wrong_length_last"] - r["wrong_length_first"] for r in results[v])
                 for v in names if all("wrong_length_last" in r for r in results[v])}
        text = (f"Before GRPO the SFT checkpoint scores exact match {before:.3f}. " + text + " Wrong answers' length, "
                "last quarter minus first quarter of the run (tokens; the length bias the Dr. GRPO paper attributes "
                "to `grpo` would show as a larger rise there): " + ", ".join(f"`{v}` {d:+.2f}" for v, d in drift.items()) + ".")
    return text


def _compare(family: str, results: dict) -> str:
    """One group's sentence; the first variant is the default."""
    metric = HEADLINE[family]
    stats = {}
    for v, runs in results.items():
        values = [r[metric] for r in runs if metric in r] if not v.startswith("_") else []
        if values:
            stats[v] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    default = next(iter(stats))
    lower_is_better = metric in ("grad_rel_error", "val_loss")
    mean_d, std_d = stats[default]
    better, worse = [], []
    for v, (mean, std) in stats.items():
        if v != default and abs(mean - mean_d) > 2 * (std + std_d):
            (better if (mean < mean_d) == lower_is_better else worse).append(f"`{v}` ({mean:.3f})")
    seeds = len(bench_seeds(results))
    text = (f"On `{metric}` ({'lower' if lower_is_better else 'higher'} is better; {seeds} seed{'s' if seeds != 1 else ''}), "
            f"the default `{default}` scores {mean_d:.3f} ± {std_d:.3f}; ")
    text += f"clearly worse: {', '.join(worse)}; " if worse else "no variant is clearly worse; "
    text += f"clearly better: {', '.join(better)}" if better else "none is clearly better"
    text += " (clearly: the means differ by more than twice the summed seed standard deviations; the rest are within noise)."
    return text


def bench_seeds(results: dict) -> list:
    return next(runs for v, runs in results.items() if not v.startswith("_"))


def rebuild_report(family: str, out: Path) -> None:
    """Rewrite `<out>/<family>.md` and its plots from its JSON, keeping the original run's provenance."""
    results = json.loads((out / f"{family}.json").read_text())
    old = (out / f"{family}.md").read_text()
    provenance = old[old.index("## Run"):]
    seeds = [str(s) for s in range(len(bench_seeds(results)))]
    body = _report_body(family, results, seeds, out)
    (out / f"{family}.md").write_text(f"# Variant family: `{family}`\n\n" + body + "\n" + provenance)


def _report_body(family: str, results: dict, seeds: list[str], out: Path) -> str:
    report = Report(family, "", argparse.Namespace(quick=False, repeats=1, warmup=0))
    _fill(report, family, results, seeds, out)
    return "\n".join(report.parts)


def write_report(family: str, results: dict, args, out: Path, report: Report) -> None:
    _fill(report, family, results, [str(s) for s in args.seeds], out)
    report.write(out)
    (out / f"{family}.json").write_text(json.dumps(results, indent=1))


def _fill(report: Report, family: str, results: dict, seeds: list[str], out: Path) -> None:
    variants = [v for v in results if not v.startswith("_")]
    metrics = list(dict.fromkeys(k for v in variants for k, x in results[v][0].items() if isinstance(x, float)))

    def cell(v: str, m: str, fmt: Callable[[list[float]], str]) -> str:
        values = [r[m] for r in results[v] if m in r]
        return fmt(values) if values else "–"

    report.text(summary_sentence(family, results))
    report.text("Mean ± standard deviation over seeds:")
    report.table(["variant", *metrics], [[f"`{v}`", *(cell(v, m, mean_std) for m in metrics)] for v in variants])
    report.text("Every seed (seeds " + ", ".join(seeds) + "):")
    per_seed = lambda values: " / ".join(f"{x:.3f}" for x in values)  # noqa: E731
    report.table(["variant", *metrics], [[f"`{v}`", *(cell(v, m, per_seed) for m in metrics)] for v in variants])
    for png in plot(family, results, metrics, out):
        report.text(f"![{png.stem}]({png.name})")


def plot(family: str, results: dict, metrics: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in results if not v.startswith("_")]
    paths = []
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, v in enumerate(variants):
            values = [r[metric] for r in results[v] if metric in r]
            if not values:
                continue
            ax.bar(i, statistics.mean(values), color="#9ecae1")
            ax.scatter([i] * len(values), values, color="#08519c", s=12, zorder=3)  # every seed
        ax.set_xticks(range(len(variants)), variants, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
    fig.tight_layout()
    paths.append(out / f"{family}_metrics.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    for key, label in CURVES.get(family, CURVES["default"]):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for v in variants:
            curves = [r[key] for r in results[v] if r.get(key)]
            if not curves:
                continue
            n = min(map(len, curves))
            stacked = torch.tensor([c[:n] for c in curves])
            mean, low, high = stacked.mean(0), stacked.min(0).values, stacked.max(0).values
            ax.plot(mean, label=v, linewidth=1)
            ax.fill_between(range(n), low, high, alpha=0.2)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(f"{label} (mean, min-max over seeds)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        paths.append(out / f"{family}_{key.replace('curve', 'curves')}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# the curves each family plots: (row key, y-axis label)
CURVES = {"default": [("curve", "train/loss")],
          "grpo": [("curve", "mean reward of the step's rollouts"), ("length_curve", "mean completion length (tokens)")]}


RUNNERS = {"loss_mask": family_loss_mask, "normalize": family_normalize, "packing": family_packing, "dpo": family_dpo,
           "grpo": family_grpo, "alignment": family_alignment}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n\n")[0], default_repeats=1)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--preset", default="demo", help="model preset (tiny, demo, small, ...)")
    parser.add_argument("--sft-data", nargs="+", type=Path, default=None,
                        help="SFT files (alpaca, sharegpt, messages) instead of the embedded tasks, e.g. "
                             "../shared/data/llamafactory/alpaca_en_demo.json; exact match stays on the embedded tasks")
    parser.add_argument("--pref-data", nargs="+", type=Path, default=None,
                        help="preference files for the dpo and alignment families instead of the embedded pairs")
    parser.add_argument("--scale", type=float, default=0.5, help="multiply every run's steps (1.0: 200 SFT, 150 DPO steps)")
    parser.add_argument("--eval", type=int, default=48, help="held-out prompts per evaluation")
    parser.add_argument("--cache", default=".cache/llmstages-variants", help="tokenizer, token caches, base checkpoints")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True,
                        help="log every run to offline W&B under <cache>/wandb, grouped by family and variant")
    parser.add_argument("--rebuild", action="store_true", help="rewrite the reports and plots in --out from their JSON")
    args = parser.parse_args(argv)
    if args.rebuild:
        for family in args.families:
            rebuild_report(family, args.out or RESULTS_DIR)
        return
    if args.quick:
        args.seeds, args.scale, args.eval, args.preset, args.wandb = args.seeds[:1], 0.02, 4, "tiny", False
    torch.set_num_threads(args.threads or 2)
    out = output_dir(args)
    bench = Bench(args, out)
    for family in args.families:
        report = Report(family, f"Variant family: `{family}`", args)
        results = RUNNERS[family](bench)
        write_report(family, results, args, out, report)


if __name__ == "__main__":
    main()
