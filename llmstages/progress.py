"""What a run prints while it trains: a step bar in a terminal, plain lines in a log file.

Design choices:
- Progress counts optimiser steps (`trainer.global_step` of `max_steps`),
  the unit a run is configured and resumed in, never micro-batches within
  an epoch.
- In a terminal (`sys.stdout.isatty()`): Lightning's rich bar over the whole
  run's steps, with metric names shown in full (the metrics column wraps
  instead of cutting at the console's width).
- Anywhere else (a cluster job writing to a file, a pipe): a plain line every
  `every` optimiser steps (the trainer's `log_every_n_steps` unless given) and
  whenever `seconds` (30) have passed since the last one, so a log is never
  silent for long: `<stage> step s/max | loss | tokens/s | elapsed | ETA`, plus
  the stage's progress-bar metrics, and one line per validation with its
  `val/*` metrics. Rich's live display would write nothing useful there.
- Only rank 0 prints (Lightning disables progress bars on other ranks).
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch.callbacks import ProgressBar
from rich.table import Column

from llmstages.callbacks import StageProgressBar, batch_tokens
from llmstages.checkpointing import stage_name

DEFAULT_SECONDS = 30.0


def make_progress_bar(stage: str | None = None) -> ProgressBar:
    """The progress display for this process's stdout: a step bar in a terminal, plain lines otherwise."""
    return StepProgressBar() if sys.stdout.isatty() else LogProgress(stage)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _number(value: Any) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{value:.4g}"


class StepProgressBar(StageProgressBar):
    """The rich bar over optimiser steps when the run is bounded by `max_steps`, with full metric names."""

    def _steps(self) -> int | None:
        steps = self.trainer.max_steps
        return steps if steps is not None and steps > 0 else None

    @property
    def total_train_batches(self):
        return self._steps() or super().total_train_batches

    def _init_progress(self, trainer) -> None:
        super()._init_progress(trainer)
        if self._metric_component is not None:  # wrap long names instead of cutting them
            self._metric_component._table_column = Column(no_wrap=False, overflow="fold", ratio=1)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._steps() is None or self.train_progress_bar_id is None:
            super().on_train_epoch_start(trainer, pl_module)  # the one bar of a step-bounded run starts here
        elif self.progress is not None:
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(trainer.current_epoch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._steps() is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-run
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class LogProgress(ProgressBar):
    """Plain progress lines for a stdout that is not a terminal (see the module docstring)."""

    def __init__(self, stage: str | None = None, every: int | None = None, seconds: float = DEFAULT_SECONDS) -> None:
        """
        Args:
            stage: the name each line starts with (default: the stage's, `sft` for `SFTModule`).
            every: a line every this many optimiser steps (default: the trainer's `log_every_n_steps`).
            seconds: and a line whenever this many seconds have passed since the last one.
        """
        super().__init__()
        self.stage, self.every, self.seconds = stage, every, seconds
        self._enabled = True
        self._reset()

    def _reset(self) -> None:
        self._start = self._last_print = time.monotonic()
        self._first_step = self._last_step = 0
        self._tokens = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **{"flush": True, **kwargs})

    def on_train_start(self, trainer, pl_module) -> None:
        self._reset()
        self.stage = self.stage or stage_name(type(pl_module).__name__)
        self._first_step = self._last_step = trainer.global_step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else "?"
        self.print(f"{self.stage}: training from step {trainer.global_step} to {total} "
                   f"(a line every {self._every(trainer)} steps and every {self.seconds:g} s)")

    def _every(self, trainer) -> int:
        return self.every or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict) and ("input_ids" in batch or "chosen_input_ids" in batch):
            self._tokens += batch_tokens(batch)[0] * trainer.world_size  # GRPO's prompt batches: generated, not counted
        step = trainer.global_step
        if step == self._last_step:
            return  # within an accumulation: not a new optimiser step
        now = time.monotonic()
        last = trainer.max_steps is not None and step >= trainer.max_steps > 0
        if step % self._every(trainer) == 0 or now - self._last_print >= self.seconds or last:
            self.print(self._line(trainer, pl_module, step, now))
            self._last_print = now
        self._last_step = step

    def _line(self, trainer, pl_module, step: int, now: float) -> str:
        elapsed = now - self._start
        done = step - self._first_step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        eta = (total - step) * elapsed / done if total and done else math.inf
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        loss = trainer.callback_metrics.get("train/step_loss", trainer.callback_metrics.get("train/loss"))
        parts = [f"{self.stage} step {step}/{total or '?'}"]
        if loss is not None:
            parts.append(f"loss {_number(loss)}")
        if self._tokens:
            parts.append(f"tokens/s {self._tokens / max(elapsed, 1e-9):.0f}")
        parts.append(f"elapsed {_duration(elapsed)}")
        parts.append(f"ETA {_duration(eta)}")
        shown = [f"{k} {_number(v)}" for k, v in metrics.items() if not k.startswith("val/") and k != "train/loss"]
        return " | ".join(parts + shown)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn not in ("fit", "validate"):
            return
        self.stage = self.stage or stage_name(type(pl_module).__name__)  # validate: no training started
        values = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            where = f"step {trainer.global_step}" if trainer.state.fn == "fit" else "checkpoint"
            self.print(f"{self.stage} validation at {where}: "
                       + " | ".join(f"{k} {_number(v)}" for k, v in sorted(values.items())))

    def on_train_end(self, trainer, pl_module) -> None:
        self.print(f"{self.stage}: done at step {trainer.global_step} in {_duration(time.monotonic() - self._start)}")
