"""Small helpers several test files share (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
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
    """A script under benchmarks/ as a module (its own imports of `common` resolve)."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def sharpen(module: torch.nn.Module, std: float = 0.15, seed: int = 1) -> None:
    """Replace the weights with larger random ones so outputs depend visibly on every input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif "norm" in name:
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
