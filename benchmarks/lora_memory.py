"""Trainable-state and optimiser memory of a `1b`-shape model: LoRA vs full fine-tuning.

The model is built on the meta device (no memory is allocated) and the
numbers are computed from parameter counts, so this runs anywhere in
seconds. Per setting:

- trainable parameters (what `apply_lora` leaves with `requires_grad`);
- trainable weights, fp32 (what a trainable checkpoint holds; the master
  weights under Lightning's `bf16-mixed`);
- gradients, fp32, one per trainable parameter;
- AdamW state: `exp_avg` and `exp_avg_sq`, fp32, two per trainable parameter;
- the total of weights (frozen ones too) + gradients + AdamW state, with the
  frozen base weights in fp32 (`bf16-mixed`, master weights) and in bf16
  (a base kept in bf16, as `bf16-true` or a frozen bf16 copy keeps it).

Activations are not included: they depend on batch size and sequence length
(and shrink with activation checkpointing), not on the choice of LoRA.

    python -m benchmarks.lora_memory
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from benchmarks.common import RESULTS, command_line, git_commit, refuse_dirty_results
from llmstages.model import ModelConfig, Transformer
from llmstages.model.lora import LoRAConfig, apply_lora, trainable_parameters

GIB = 1024**3
FP32, BF16 = 4, 2

SETTINGS: list[tuple[str, LoRAConfig | None]] = [
    ("full fine-tuning", None),
    ("LoRA r=8, q,k,v,o", LoRAConfig(rank=8, targets=["q", "k", "v", "o"])),
    ("LoRA r=16, q,k,v,o", LoRAConfig(rank=16, targets=["q", "k", "v", "o"])),
    ("LoRA r=16, all linears", LoRAConfig(rank=16, targets=["q", "k", "v", "o", "gate", "up", "down"])),
    ("LoRA r=64, all linears", LoRAConfig(rank=64, targets=["q", "k", "v", "o", "gate", "up", "down"])),
]


def measure(preset: str, lora: LoRAConfig | None) -> dict[str, float]:
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name(preset))
    if lora is not None:
        apply_lora(model, lora)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for _, p in trainable_parameters(model))
    frozen = total - trainable
    grads, adam = trainable * FP32, trainable * 2 * FP32
    return {
        "total": total,
        "trainable": trainable,
        "weights_trainable": trainable * FP32,
        "grads": grads,
        "adam": adam,
        "sum_fp32_base": total * FP32 + grads + adam,
        "sum_bf16_base": frozen * BF16 + trainable * FP32 + grads + adam,
    }


def _size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


def report(preset: str) -> str:
    rows = [(name, measure(preset, lora)) for name, lora in SETTINGS]
    full = rows[0][1]
    lines = [
        f"# LoRA vs full fine-tuning: memory of the `{preset}` shape (Llama-3.2-1B)",
        "",
        f"Command: `{command_line()}`; commit {git_commit()}; torch {torch.__version__}, Python {platform.python_version()}. "
        "Computed from parameter counts of the model built on the meta device (no allocation).",
        "",
        f"Model: {full['total']:,} parameters (tied embeddings). Weights/gradients/AdamW state in fp32; "
        "activations excluded (they depend on batch and length, not on LoRA).",
        "",
        "| setting | trainable params | % of model | trainable weights | gradients | AdamW state | "
        "total, frozen base fp32 | total, frozen base bf16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {m['trainable']:,} | {100 * m['trainable'] / m['total']:.2f}% | "
            f"{_size(m['weights_trainable'])} | {_size(m['grads'])} | {_size(m['adam'])} | "
            f"{_size(m['sum_fp32_base'])} | {_size(m['sum_bf16_base'])} |"
        )
    best = rows[2][1]
    lines += [
        "",
        f"AdamW state: {_size(full['adam'])} for full fine-tuning vs {_size(best['adam'])} with "
        f"LoRA r=16 on q,k,v,o ({full['adam'] / best['adam']:.0f}x less). The frozen base still has to be held "
        "(and, under FSDP, sharded); LoRA removes its gradients and optimiser state, and its trainable "
        "checkpoint state is the adapters alone.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--out", type=Path, default=RESULTS / "lora_memory.md")
    args = parser.parse_args()
    refuse_dirty_results(args.out.parent)
    text = report(args.preset)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
