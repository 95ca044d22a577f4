"""Preemption is a checkpoint now: SIGTERM (or SLURM's requeue signal) ends a fit at an optimiser-step boundary,
with a checkpoint there, `run.json` saying `preempted`, and exit code `PREEMPTED_EXIT_CODE`.

Design choices:
- Lightning turns SIGTERM into a `SIGTERMException` after the current *micro-batch*:
  no checkpoint, everything since the last periodic save lost, and exit 0 for a
  single process (the scheduler sees success and never requeues). Its SLURM handler
  saves `hpc_ckpt_<n>.ckpt` from inside the signal handler, mid-step. Here the signal
  handler only records the request; everything else happens at the next step boundary.
- The step in progress is finished, not rolled back: its micro-batches are cheap next
  to a grace period (SLURM `--signal=USR1@90`, Kubernetes' `terminationGracePeriodSeconds`).
- At every optimiser-step boundary each rank all-reduces one "stop requested" flag, so a
  signal that reaches one rank stops all of them at the same step (no rank is left in a
  collective the others never enter); the cost is one scalar all-reduce per step.
- The checkpoint is the run's `last.ckpt` (the first ModelCheckpoint's folder), written
  like every checkpoint: atomically, with the data loader's position, so `--ckpt_path
  last` resumes with no optimiser step lost. A second signal during the save only sets
  the flag again; a SIGKILL mid-write leaves the previous `last.ckpt` (atomic rename).
- The run stops at the next hook after the save (the next micro-batch's start, a
  validation start, the epoch end), so the saved step's metrics reach the loggers first.
- Under SLURM with `auto_requeue` (Lightning's `SLURMEnvironment`, on by default), the
  requeue signal does the same and rank 0 then requeues the job (`scontrol requeue`, as
  Lightning does); the requeued job continues the run (`run_plan`: the run whose
  `run.json` holds this job id). SIGTERM alone never requeues: the scheduler decides.
- A signal during the last step lets the run finish normally (exit 0).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from llmstages import checkpointing

log = logging.getLogger(__name__)

# 128 + SIGTERM, what a shell and Kubernetes report for a SIGTERMed process: "preempted, resume me".
# Distinct from 0 (finished) and 1 (failed); a Kubernetes Job's podFailurePolicy can match it.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(RuntimeError):
    """The run stopped on a preemption signal after saving `checkpoint` at optimiser step `step`."""

    def __init__(self, signame: str, step: int, checkpoint: str) -> None:
        super().__init__(f"{signame} received: stopped at optimiser step {step} with a checkpoint at {checkpoint}; "
                         f"continue with --ckpt_path last (exit code {PREEMPTED_EXIT_CODE})")
        self.step, self.checkpoint = step, checkpoint


def _slurm_requeue_signal(trainer) -> int | None:
    """The signal SLURM sends ahead of the kill, when Lightning's SLURM environment asks to requeue on it."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is None and SLURMEnvironment.detect():
        environment = SLURMEnvironment()
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return int(environment.requeue_signal or signal.SIGUSR1)
    return None


def requeue_slurm_job(env=os.environ) -> None:
    """`scontrol requeue <job>` (Lightning's auto-requeue); a failure is reported, never raised."""
    job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if not job or not re.fullmatch(r"[0-9_-]+", job):
        log.warning(f"SLURM requeue skipped: no usable job id ({job!r})")
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        if result.returncode == 0:
            log.warning(f"requeued SLURM job {job}")
        else:
            log.warning(f"requeuing SLURM job {job} failed (exit {result.returncode}): {result.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning(f"requeuing SLURM job {job} failed: {err}")


class PreemptionCheckpoint(Callback):
    """Turns SIGTERM (and SLURM's requeue signal) into a checkpoint at the step boundary and `Preempted`."""

    def __init__(self, run_dir: str | Path, checkpoint_dir: str | Path) -> None:
        """
        Args:
            run_dir: the run folder (its run.json records `preempted`).
            checkpoint_dir: where `last.ckpt` goes when no ModelCheckpoint names a folder.
        """
        self.run_dir, self.checkpoint_dir = Path(run_dir), Path(checkpoint_dir)
        self.requested: int | None = None
        self._previous: dict[int, object] = {}
        self._requeue_signal: int | None = None
        self._seen_step: int | None = None
        self._saved: tuple[int, str, int] | None = None  # (step, checkpoint, the agreed signal)

    # ----------------------------------------------------------------- signals: only a flag

    def _on_signal(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signum  # a second signal (during the save too) changes nothing

    def _install(self, trainer) -> None:
        # after Lightning registered its own handlers (Trainer._run), which it restores at teardown
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        self._requeue_signal = _slurm_requeue_signal(trainer)
        for signum in {int(signal.SIGTERM), *([self._requeue_signal] if self._requeue_signal else [])}:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _uninstall(self) -> None:
        # only where ours is still in place: Lightning's teardown (before the callbacks' teardown hook)
        # already restored the handlers from before the fit, and those must stay
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous.items():
                if signal.getsignal(signum) == self._on_signal:
                    signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._install(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install(trainer)
        self._seen_step = trainer.global_step

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._uninstall()

    # ----------------------------------------------------------------- the step boundary: agree, save

    def _agreed(self, trainer) -> int | None:
        """The signal any rank received (the same answer on every rank), else None."""
        flag = torch.tensor(float(self.requested or 0))
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag.to(trainer.strategy.root_device), reduce_op="max")
        signum = int(flag.item())
        return signum or None

    def _last_path(self, trainer) -> Path:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        return self.checkpoint_dir / "last.ckpt"

    def _finishing(self, trainer) -> bool:
        return 0 < trainer.max_steps <= trainer.global_step

    def _boundary(self, trainer) -> None:
        if self._saved is not None or self._finishing(trainer):
            return
        signum = self._agreed(trainer)
        if signum is None:
            return
        path = self._last_path(trainer)
        trainer.save_checkpoint(path)  # every rank: a collective save, atomic through the trainer's CheckpointIO
        for logger in trainer.loggers:
            logger.save()  # what is logged so far is on disk now (this step's metrics follow this hook; finalize flushes them)
        self._saved = (trainer.global_step, str(path), signum)
        name = signal.Signals(signum).name
        if trainer.is_global_zero:
            if self.run_dir.is_dir():
                checkpointing.write_run_info(
                    self.run_dir, status="preempted", signal=name, preempted_at_step=trainer.global_step,
                    last_checkpoint=str(path), stopped=time.strftime("%Y-%m-%d %H:%M:%S"), clear=("error",),
                )
            log.warning(f"{name}: checkpoint at optimiser step {trainer.global_step} saved to {path}; stopping")
            if signum == self._requeue_signal:
                requeue_slurm_job()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._seen_step:  # an optimiser step just ended (not inside an accumulation)
            self._seen_step = trainer.global_step
            self._boundary(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._boundary(trainer)  # a signal during validation: every rank validated, the same boundary

    # ----------------------------------------------------------------- stop, once the step's metrics are logged

    def _stop_if_saved(self) -> None:
        if self._saved is not None:
            step, path, signum = self._saved
            raise Preempted(signal.Signals(signum).name, step, path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._stop_if_saved()

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._stop_if_saved()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_if_saved()
