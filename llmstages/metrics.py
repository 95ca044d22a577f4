"""Weighted running means that aggregate correctly across batches and ranks.

Every stage metric is a ratio (loss per token, accuracy per reply, reward
per pair). Averaging per-batch ratios would weight a two-token batch like a
thousand-token one, so each is a torchmetrics `MeanMetric` updated with
(value, weight) and synchronised across data-parallel ranks on `compute()`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric


class WeightedMeans(nn.Module):
    def __init__(self, *names: str) -> None:
        super().__init__()
        self.means = nn.ModuleDict({name.replace("/", "__"): MeanMetric() for name in names})

    def update(self, name: str, value: Tensor | float, weight: Tensor | float = 1.0) -> None:
        value = torch.as_tensor(value, dtype=torch.float32).detach()
        weight = torch.as_tensor(weight, dtype=torch.float32)
        if float(weight.sum()) > 0:
            self.means[name.replace("/", "__")].update(value, weight)

    def compute_and_reset(self) -> dict[str, Tensor]:
        """Synchronised means of everything updated on any rank.

        Every metric is computed on every rank (compute() is a collective under
        DDP, so skipping it on a rank that saw no update would hang the others);
        a metric with zero total weight everywhere comes out NaN and is left out.
        """
        out = {}
        for key, metric in self.means.items():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                value = metric.compute()
            if not torch.isnan(value):
                out[key.replace("__", "/")] = value
            # `trainer.validate` runs in inference mode; states reset there would be inference
            # tensors that the validation inside a later `fit` (no inference mode) cannot update.
            with torch.inference_mode(False):
                metric.reset()
        return out
