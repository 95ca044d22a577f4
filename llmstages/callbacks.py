"""Callbacks: throughput and MFU measured honestly.

Design choices:
- Throughput is reported twice: all tokens per second (what the hardware
  processed) and labelled tokens per second (what was trained), so padding
  and masking cannot inflate it (torchtune PR #1875, LitGPT pretrain.py).
- Durations are measured between batch start and end with a synchronised
  clock on CUDA, summed over a window of steps; never a timestamp divided
  into a count.
- MFU = achieved FLOP/s / peak FLOP/s, from the model's `flops_per_token`;
  peak is looked up for known GPUs (bf16 dense) or given explicitly; on CPU
  without `peak_flops` it is not logged.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch.callbacks import Callback

from llmstages.losses import count_targets

# dense bf16 peak FLOP/s
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in _PEAK_FLOPS.items() if key in name), None)


def batch_tokens(batch: dict) -> tuple[int, int]:
    """(all tokens, labelled target tokens) of a batch of any stage."""
    total = labelled = 0
    for key, value in batch.items():
        if key.endswith("input_ids"):
            total += value.numel()
        elif key.endswith("labels"):
            labelled += count_targets(value)
    return total, labelled


class ThroughputMonitor(Callback):
    def __init__(self, window: int = 10, peak_flops: float | None = None) -> None:
        self.window, self.peak = window, peak_flops
        self._reset()

    def _reset(self) -> None:
        self.seconds, self.tokens, self.labelled, self.steps = 0.0, 0, 0, 0

    def _sync(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module.device)
        self.seconds += time.perf_counter() - self._start
        total, labelled = batch_tokens(batch)
        self.tokens += total * trainer.world_size
        self.labelled += labelled * trainer.world_size
        self.steps += 1
        if self.steps < self.window:
            return
        metrics = {
            "perf/tokens_per_sec": self.tokens / self.seconds,
            "perf/labelled_tokens_per_sec": self.labelled / self.seconds,
            "perf/labelled_fraction": self.labelled / max(1, self.tokens),
        }
        peak = self.peak or peak_flops(pl_module.device)
        if peak and hasattr(pl_module, "backbone"):
            seq_len = batch[next(k for k in batch if k.endswith("input_ids"))].shape[1]
            flops = pl_module.backbone.flops_per_token(seq_len) * self.tokens
            metrics["perf/mfu"] = flops / self.seconds / (peak * trainer.world_size)
        pl_module.log_dict(metrics, rank_zero_only=True)
        self.last_metrics = metrics
        self._reset()
