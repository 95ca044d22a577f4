"""Fault injection for resume checks: SIGKILL a run at a chosen optimiser step, deterministically.

Killing from outside (poll for `last.ckpt`, then SIGKILL) races the run: on a busy machine
it can train on past the checkpoint and die at a later one, which tests a different thing
and loses the step logged after it. This callback kills the run itself at the start of
the first micro-batch after step `step`, so step `step`'s checkpoint is on disk (every
rank has passed Lightning's post-save barrier) and nothing of step `step + 1` is done.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILL the run's whole process group when training is about to start step `step`.

    Use only in a run started in its own session (`start_new_session=True`): the group
    is then the run, all of its ranks and nothing else.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.killpg(os.getpgid(0), signal.SIGKILL)


class SignalAtStep(Callback):
    """Send `signum` (default SIGTERM) to this process at the start of micro-batch `micro` of optimiser
    step `step` (0-based within the step's accumulation), on rank `rank` only (None: every rank):
    a preemption landing inside an accumulated step, at a chosen point instead of a timer's.

    `again_during_save`: send it a second time while the checkpoint is being written.
    """

    def __init__(self, step: int, micro: int = 0, rank: int | None = None, signum: int = int(signal.SIGTERM),
                 again_during_save: bool = False) -> None:
        self.step, self.micro, self.rank, self.signum = step, micro, rank, signum
        self.again_during_save, self.sent = again_during_save, False

    def _mine(self, trainer) -> bool:
        return self.rank is None or trainer.global_rank == self.rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        at = trainer.global_step == self.step and batch_idx % trainer.accumulate_grad_batches == self.micro
        if at and not self.sent and self._mine(trainer):
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.again_during_save and self.sent and self._mine(trainer):
            os.kill(os.getpid(), self.signum)
