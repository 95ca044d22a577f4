"""Callbacks: throughput and MFU measured honestly; the run's safety and bookkeeping.

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
- `NonFiniteGuard` stops (or, opt-in, skips) at the first non-finite loss or
  gradient, every rank deciding together; `RunFolder` records a run's outcome
  (finished, failed with its error, preempted) and moves its stage's `latest` link; `StageProgressBar` shows a sane epoch.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from llmstages import checkpointing
from llmstages.data.batch import sequence_prefixes
from llmstages.losses import count_targets
from llmstages.options import NonFinite, check_choice, choices
from llmstages.preemption import Preempted

# dense bf16 peak FLOP/s
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in _PEAK_FLOPS.items() if key in name), None)


def batch_tokens(batch: dict) -> tuple[int, int]:
    """(all tokens, labelled target tokens) of a batch of the contract (`llmstages.data.batch`)."""
    prefixes = sequence_prefixes(batch)
    total = sum(batch[f"{p}input_ids"].numel() for p in prefixes)
    return total, sum(count_targets(batch[f"{p}labels"]) for p in prefixes)


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
            seq_len = batch[f"{sequence_prefixes(batch)[0]}input_ids"].shape[1]
            flops = pl_module.backbone.flops_per_token(seq_len) * self.tokens
            metrics["perf/mfu"] = flops / self.seconds / (peak * trainer.world_size)
        pl_module.log_dict(metrics, rank_zero_only=True)
        self.last_metrics = metrics
        self._reset()


# ----------------------------------------------------------------------------- non-finite guard


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm; the message names stage, step and quantity."""


class NonFiniteGuard(Callback):
    """Stops a run at the first non-finite loss or gradient norm, before it can reach the weights.

    The loss is checked before its backward, the gradients before the optimiser step, each
    with one all-reduced flag so every rank takes the same decision (no rank left waiting).
    Nothing non-finite is ever applied, so no checkpoint can hold it and `last.ckpt` keeps
    the last finite state. `action="skip_step"` drops the step's gradients instead (the
    optimiser skips parameters without a gradient), counts it, and stops after
    `max_skipped_steps` skips.
    """

    def __init__(self, stage: str = "run", action: NonFinite = "stop", max_skipped_steps: int = 10) -> None:
        check_choice("nonfinite", action, choices(NonFinite))
        if max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
        self.stage, self.action, self.max_skipped = stage, action, max_skipped_steps
        self.skipped = 0

    def _any_rank(self, trainer, bad: bool) -> bool:
        flag = torch.tensor(float(bad))
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag.to(trainer.strategy.root_device), reduce_op="sum")
        return bool(flag.item() > 0)

    def _stop(self, trainer, quantity: str, value: str) -> None:
        raise NonFiniteError(
            f"{self.stage}: non-finite {quantity} ({value}) at step {trainer.global_step}; stopped before it reached "
            "the weights, so the last checkpoint holds the last finite state. Lower the learning rate, or pass "
            "--nonfinite skip_step to skip such steps"
        )

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        value = loss.detach()
        bad = not bool(torch.isfinite(value).all())
        if self._any_rank(trainer, bad) and self.action == "stop":
            self._stop(trainer, "training loss", f"{value.item():g}" if bad else "on another rank")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        norm = pl_module.gradient_norm() if hasattr(pl_module, "gradient_norm") else None
        # a non-finite gradient makes the norm non-finite: one check (one host sync) instead of one per
        # parameter; the per-parameter check decides only then (a norm can also overflow from finite values)
        if norm is None:
            bad = self._local_grads_nonfinite(pl_module)
        else:
            bad = not bool(torch.isfinite(norm)) and self._local_grads_nonfinite(pl_module)
        if not self._any_rank(trainer, bad):
            return
        if self.action == "stop":
            self._stop(trainer, "gradient norm", "nan/inf" if bad else "on another rank")
        self.skipped += 1
        if self.skipped > self.max_skipped:
            self._stop(trainer, f"gradient norm on {self.skipped} steps (more than max_skipped_steps={self.max_skipped})", "nan/inf")
        for p in pl_module.parameters():
            p.grad = None  # torch optimisers skip parameters without a gradient: this step changes nothing
        rank_zero_warn(f"{self.stage}: skipped step {trainer.global_step}: non-finite gradients ({self.skipped} so far)")
        pl_module.log("train/skipped_steps", float(self.skipped), rank_zero_only=True)

    @staticmethod
    def _local_grads_nonfinite(pl_module) -> bool:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        return any(not bool(torch.isfinite(g).all()) for g in local if g.numel())

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


# ----------------------------------------------------------------------------- run folder bookkeeping


class RunFolder(Callback):
    """Records a run's outcome in its `run.json`; a fit that ends normally becomes its stage's `latest`."""

    def __init__(self, run_dir: str | Path, finish: bool = True) -> None:
        self.run_dir, self.finish = Path(run_dir), finish

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero and (self.run_dir / "checkpoints").is_dir():
            checkpointing.remove_stale_temporaries(self.run_dir / "checkpoints")

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.run_dir.is_dir():
            return
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        checkpointing.write_run_info(
            self.run_dir, status="finished", finished=time.strftime("%Y-%m-%d %H:%M:%S"), clear=("error",),
            global_step=trainer.global_step, last_checkpoint=checkpoint,
        )
        if self.finish and not trainer.interrupted:
            checkpointing.mark_latest(self.run_dir)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.finish and trainer.is_global_zero and self.run_dir.is_dir() and not trainer.training:
            checkpointing.write_run_info(self.run_dir, status="finished", finished=time.strftime("%Y-%m-%d %H:%M:%S"))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not trainer.is_global_zero or not self.run_dir.is_dir():
            return
        if isinstance(exception, Preempted):
            return  # PreemptionCheckpoint recorded it, with its checkpoint
        if isinstance(exception, SIGTERMException):  # Lightning's: a SIGTERM before training began, nothing lost
            checkpointing.write_run_info(self.run_dir, status="preempted", clear=("error",))
            return
        checkpointing.write_run_info(self.run_dir, status="failed", error=f"{type(exception).__name__}: {exception}")


class StageProgressBar(RichProgressBar):
    """Lightning's rich bar, without `Epoch 2/-2` when the run is bounded by steps (max_epochs -1)."""

    def _get_train_description(self, current_epoch: int) -> str:
        epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{epochs - 1}" if epochs is not None and epochs > 0 else "")
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            text += f" (max {self.trainer.max_steps} steps)"
        if len(self.validation_description) > len(text):
            text = f"{text:{len(self.validation_description)}}"
        return text
