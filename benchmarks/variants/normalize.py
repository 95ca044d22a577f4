"""`normalize` family: token, micro_batch, sequence, sum.

For one optimiser step of 4 accumulated micro-batches of very different
lengths: the cosine and the relative norm error of each variant's gradient
against the full-batch token-mean gradient (which `token` computes by
construction, so these measure distance from `token`'s gradient, not
quality), in one process (`grad_*`) and split over 2 gloo processes of 2
micro-batches each with gradients averaged as DDP does (`ddp_grad_*`), and
the effective per-token weight of the shortest and longest example (the
length bias); then validation loss and exact match after training with that
accumulation.
"""

from __future__ import annotations

import lightning as L
import torch

from benchmarks.variants.runner import (Bench, brief, cosine, fit, held_out_loss, relative_error,
                                        reply_quality)
from llmstages.data import SFTData
from llmstages.losses import count_sequences, count_targets, reduce_token_loss
from llmstages.options import Normalize, choices
from llmstages.stages import SFTModule


def length_mixed_step(data: SFTData, per_micro: int = 2, micro_batches: int = 4) -> list[dict]:
    """One step's micro-batches with very different lengths: the shortest and longest examples, sorted."""
    data.setup("fit")
    examples = sorted(data.train_set.items, key=lambda e: len(e["input_ids"]))
    half = per_micro * micro_batches // 2
    chosen = examples[:half] + examples[-half:]
    return [data.collate(chosen[i * per_micro:(i + 1) * per_micro]) for i in range(micro_batches)]


def step_counts(micro: list[dict]) -> tuple[int, int]:
    """Target tokens and sequences of the given micro-batches."""
    return sum(count_targets(b["labels"]) for b in micro), sum(count_sequences(b["labels"]) for b in micro)


def accumulate_micro_batches(module, micro: list[dict], normalize: str, counts: tuple[int, int], grad_scale: float) -> None:
    """Backward over `micro` as the stage does it: loss(step counts, grad_scale) / accumulation steps (Lightning)."""
    for batch in micro:
        logps = module.target_logps(batch["input_ids"], batch["labels"], batch["position_ids"])
        loss = reduce_token_loss(-logps, batch["labels"], normalize=normalize, num_step_tokens=counts[0],
                                 num_step_sequences=counts[1], grad_scale=grad_scale)
        (loss / len(micro)).backward()


def step_gradient(module, micro: list[dict], normalize: str) -> torch.Tensor:
    """The optimiser step's gradient in one process accumulating `micro` (grad_scale = accumulation steps)."""
    module.zero_grad(set_to_none=True)
    accumulate_micro_batches(module, micro, normalize, step_counts(micro), grad_scale=len(micro))
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def ddp_worker(rank: int, world: int, rendezvous: str, build: dict, micro: list[dict], normalize: str, out: str) -> None:
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
        counts = torch.tensor(step_counts(mine), dtype=torch.float64)
        dist.all_reduce(counts)
        accumulate_micro_batches(module, mine, normalize, (int(counts[0]), int(counts[1])), grad_scale=len(mine) * world)
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world
        if rank == 0:
            torch.save(torch.cat([g.flatten() for g in grads]), out)
    finally:
        dist.destroy_process_group()


def ddp_step_gradient(build: dict, micro: list[dict], normalize: str, world: int = 2) -> torch.Tensor:
    """The step's gradient from `world` real CPU processes (gloo), each accumulating its share of `micro`."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="llmstages-ddp-") as tmp:
        out = f"{tmp}/grad.pt"
        mp.spawn(ddp_worker, args=(world, f"{tmp}/rendezvous", build, micro, normalize, out), nprocs=world)
        return torch.load(out)


def token_weights(micro: list[dict], normalize: str) -> tuple[float, float]:
    """d loss / d token-NLL of one token of the shortest and of the longest example, relative to `token`'s 1/N."""
    tokens, sequences = step_counts(micro)
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


def run(bench: Bench) -> dict:
    results, accumulate = {}, 4
    for variant in choices(Normalize):
        for seed in bench.args.seeds:
            L.seed_everything(seed, verbose=False)
            data = bench.data("sft", seed, packing="none", batch_size=2, shuffle=False)
            build = dict(preset=bench.args.preset, vocab_size=data.vocab_size, init_from=str(bench.pretrained()),
                         normalize=variant, lr=1e-3, generate_samples=0)
            module = SFTModule(**build)
            module.setup("fit")
            micro = length_mixed_step(data)
            reference = step_gradient(module, [merge(micro)], "token")
            gradient = step_gradient(module, micro, variant)
            ddp = ddp_step_gradient(build, micro, variant)
            short, long = token_weights(micro, variant)
            curve, _ = fit(module, data, bench.steps(150), accumulate=accumulate,
                           logger=bench.logger("normalize", variant, seed))
            scored = bench.data("sft", seed)
            scored.setup("validate")
            row = {"grad_cosine": cosine(gradient, reference), "grad_rel_error": relative_error(gradient, reference),
                   "ddp_grad_cosine": cosine(ddp, reference), "ddp_grad_rel_error": relative_error(ddp, reference),
                   "weight_short": short, "weight_long": long, "val_loss": held_out_loss(module, scored)["loss"],
                   **reply_quality(module.backbone, scored, bench.args.eval), "curve": curve}
            results.setdefault(variant, []).append(row)
            print(f"normalize {variant} seed {seed}: " + brief(row), flush=True)
    return results


def merge(micro: list[dict]) -> dict:
    """The step's micro-batches as one right-padded batch (the full-batch reference)."""
    length = max(b["input_ids"].shape[1] for b in micro)
    pad = lambda t, value: torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)  # noqa: E731
    return {
        "input_ids": torch.cat([pad(b["input_ids"], 0) for b in micro]),
        "labels": torch.cat([pad(b["labels"], -100) for b in micro]),
        "position_ids": torch.arange(length).expand(sum(len(b["input_ids"]) for b in micro), length),
    }

