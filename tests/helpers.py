"""Small helpers several test files share (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import torch

from llmstages.losses import IGNORE_INDEX

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def labelled_runs(labels: list[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) spans of labelled positions."""
    out, start = [], None
    for i, t in enumerate([*labels, IGNORE_INDEX]):
        if t != IGNORE_INDEX and start is None:
            start = i
        elif t == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


def load_benchmark(name: str) -> ModuleType:
    """`benchmarks.<name>`, the repository root put on sys.path (as `python -m benchmarks.<name>` has it)."""
    if str(BENCHMARKS.parent) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS.parent))
    return importlib.import_module(f"benchmarks.{name}")


def sharpen(module: torch.nn.Module, std: float = 0.15, seed: int = 1) -> None:
    """Replace the weights with larger random ones so outputs depend visibly on every input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif "norm" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
