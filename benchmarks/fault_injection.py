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
