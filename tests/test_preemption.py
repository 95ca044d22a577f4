"""Preemption is a checkpoint now: a SIGTERM landing inside an accumulated step (one process, or one rank of
two under torchrun) ends the run at the step boundary with a checkpoint there, `run.json` saying
`preempted` and exit code PREEMPTED_EXIT_CODE; `--ckpt_path last` then logs every step's loss exactly once,
equal to an uninterrupted run's. The signal comes from inside the run at a chosen micro-batch
(`benchmarks.fault_injection.SignalAtStep`), never from a timer racing it."""

import json
import signal

import pytest
import torch

from clirun import CONFIGS, TORCHRUN, fit_args, ok, run, step_losses, tiny_fragment
from llmstages.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.distributed  # spawns processes

TORCHRUN_2 = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "llmstages"]


def _preempt_and_resume(tmp_path, stage: str, *, steps: int, accumulate: int, signal_at: dict,
                        launcher: list[str] | None = None, more: tuple[str, ...] = (), extra: dict | None = None):
    cache = tmp_path / "cache"
    every = steps  # no periodic checkpoint before the end: only the preemption's
    plain = tiny_fragment(tmp_path, cache, stage=stage, steps=steps, every=every, accumulate=accumulate, extra=extra)
    signalled = tiny_fragment(tmp_path, cache, stage=stage, steps=steps, every=every, accumulate=accumulate,
                              extra=extra, signal_at=signal_at)
    root = ("--trainer.default_root_dir", str(tmp_path / "runs"), *more)
    ok(run([*fit_args(stage, plain, *root), "--run_name", "full"], tmp_path, timeout=240, launcher=launcher))
    stopped = run([*fit_args(stage, signalled, *root), "--run_name", "preempted"], tmp_path, timeout=240, launcher=launcher)
    run_dir = tmp_path / "runs" / stage / "preempted"
    boundary = signal_at["step"] + 1  # the step in progress is finished, none after it begun
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "preempted" and info["preempted_at_step"] == boundary, (info, stopped.stderr[-3000:])
    assert "error" not in info
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == boundary
    if stage != "grpo":
        assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed"] == boundary * accumulate
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left
    resumed = run([*fit_args(stage, plain, *root), "--ckpt_path", "last", "--run_name", "preempted"], tmp_path,
                  timeout=240, launcher=launcher)
    ok(resumed)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["global_step"] == steps and "error" not in info
    reference = step_losses(tmp_path / "runs" / stage / "full", "train/step_loss")
    interrupted = step_losses(run_dir, "train/step_loss")
    assert sorted(reference) == list(range(steps)) and sorted(interrupted) == list(range(steps)), (reference, interrupted)
    for step in range(steps):
        assert len(interrupted[step]) == 1, (step, interrupted[step])  # never lost, never trained twice
        assert interrupted[step][0] == pytest.approx(reference[step][0], rel=1e-6, abs=1e-9), step
    return stopped


def test_sft_sigterm_inside_an_accumulated_step_checkpoints_at_its_end(tmp_path):
    stopped = _preempt_and_resume(tmp_path, "sft", steps=5, accumulate=3, signal_at={"step": 1, "micro": 1})
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    assert "--ckpt_path last" in stopped.stderr.strip().splitlines()[-1]  # one line says what to do


def test_dpo_sigterm_twice_during_the_save_still_resumes_exactly(tmp_path):
    stopped = _preempt_and_resume(tmp_path, "dpo", steps=4, accumulate=2,
                                  signal_at={"step": 1, "micro": 1, "again_during_save": True})
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]


def test_torchrun_ddp_sigterm_on_one_rank_stops_both_at_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 only, mid-step: both ranks agree on the boundary (no deadlock), rank 0 saves."""
    ddp = ("--config", str(CONFIGS / "fragments" / "ddp.yaml"), "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    stopped = _preempt_and_resume(tmp_path, "sft", steps=4, accumulate=2, signal_at={"step": 1, "micro": 1, "rank": 1},
                                  launcher=TORCHRUN_2, more=ddp)
    # torchrun itself exits 1 when a worker exits non-zero; it reports each worker's exit code
    assert stopped.returncode != 0 and f"exitcode  : {PREEMPTED_EXIT_CODE}" in stopped.stderr, stopped.stderr[-3000:]


@pytest.mark.slow
def test_fsdp2_sigterm_on_one_lightning_spawned_rank_stops_both_at_the_same_step(tmp_path):
    """FSDP2 on 2 ranks that Lightning starts itself (`--trainer.devices 2`, no torchrun): SIGTERM to rank 1 only."""
    fsdp = ("--config", str(CONFIGS / "fragments" / "fsdp.yaml"), "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    stopped = _preempt_and_resume(tmp_path, "sft", steps=4, accumulate=2, signal_at={"step": 1, "micro": 0, "rank": 1},
                                  more=fsdp)
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]


@pytest.mark.slow
def test_grpo_reusing_its_generation_batch_preempted_between_its_updates_resumes_exactly(tmp_path):
    init = tmp_path / "init.ckpt"
    sft = tiny_fragment(tmp_path, tmp_path / "cache", stage="sft", steps=30)
    ok(run([*fit_args("sft", sft, "--trainer.default_root_dir", str(tmp_path / "runs")), "--run_name", "init"], tmp_path))
    (tmp_path / "runs" / "sft" / "init" / "checkpoints" / "last.ckpt").rename(init)
    grpo = {"model": {"init_args": {"preset": "tiny", "group_size": 4, "max_completion_length": 8, "reward": "length",
                                    "init_from": str(init), "num_iterations": 2, "warmup_steps": 1}},
            "data": {"init_args": {"max_prompt_len": 48, "num_prompts": 64, "batch_size": 2}}}
    # step 2 is the first update of a generation batch: the save lands between its two updates
    stopped = _preempt_and_resume(tmp_path, "grpo", steps=5, accumulate=1, signal_at={"step": 2}, extra=grpo)
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]


def test_after_a_fit_sigterm_handling_is_what_it_was_before(tmp_path):
    """In one process: the handler is ours only while training; afterwards the previous one is back."""
    import lightning as L

    from llmstages.data import SFTData
    from llmstages.preemption import PreemptionCheckpoint
    from llmstages.stages import SFTModule

    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(signal.getsignal(signal.SIGTERM))

    def before(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, before)
    try:
        data = SFTData(cache_dir=str(tmp_path), batch_size=2, seq_len=64)
        model = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0)
        guard = PreemptionCheckpoint(tmp_path / "run", tmp_path / "run" / "checkpoints")
        trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[guard, Probe()])
        trainer.fit(model, data)
        assert seen and all(h not in (before, signal.SIG_DFL) for h in seen)  # replaced while training
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_slurm_requeue_signal_checkpoints_requeues_and_the_requeued_job_continues_its_run(tmp_path):
    """Lightning's SLURM auto-requeue, end to end: SIGUSR1 (`--signal=USR1@90`) inside an accumulated step
    checkpoints at the step's end and calls `scontrol requeue <job>` (a stand-in records it); the requeued
    job, the same command with SLURM_RESTART_COUNT=1, continues that run with no step lost."""
    import os

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (fake / "scontrol").chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    cache, steps = tmp_path / "cache", 3
    plain = tiny_fragment(tmp_path, cache, steps=steps, accumulate=2)
    signalled = tiny_fragment(tmp_path, cache, steps=steps, accumulate=2,
                              signal_at={"step": 0, "micro": 1, "signum": int(signal.SIGUSR1)})
    root = ("--trainer.default_root_dir", str(tmp_path / "runs"))
    ok(run([*fit_args("sft", plain, *root), "--run_name", "full"], tmp_path))
    stopped = run(fit_args("sft", signalled, *root), tmp_path, **slurm)
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    [run_dir] = [p for p in (tmp_path / "runs" / "sft").iterdir() if p.name not in ("full", "latest")]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "preempted" and info["slurm_job_id"] == "4242" and info["signal"] == "SIGUSR1"
    ok(run(fit_args("sft", plain, *root), tmp_path, SLURM_RESTART_COUNT="1", **slurm))  # the requeued job
    assert {p.name for p in (tmp_path / "runs" / "sft").iterdir()} == {"full", run_dir.name, "latest"}
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    reference, interrupted = (step_losses(d, "train/step_loss") for d in (tmp_path / "runs" / "sft" / "full", run_dir))
    assert sorted(interrupted) == list(range(steps)) and all(len(v) == 1 for v in interrupted.values()), interrupted
    for step in range(steps):
        assert interrupted[step][0] == pytest.approx(reference[step][0], rel=1e-6, abs=1e-9), step
