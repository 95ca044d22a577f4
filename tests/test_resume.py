"""Exact resume: a run SIGKILLed mid-epoch and resumed with `--ckpt_path last` logs the same per-step
losses as a run never interrupted (the loader's position is in every checkpoint)."""

import json

import pytest
import torch

import signal

from clirun import CONFIGS, fit_args, ok, run, start, step_losses, tiny_fragment

pytestmark = pytest.mark.distributed  # spawns processes


def _kill_and_resume(tmp_path, stage: str, steps: int, every: int, accumulate: int, more: tuple[str, ...] = ()) -> None:
    cache = tmp_path / "cache"
    fragment = tiny_fragment(tmp_path, cache, stage=stage, steps=steps, every=every, accumulate=accumulate)
    kill = tiny_fragment(tmp_path, cache, stage=stage, steps=steps, every=every, accumulate=accumulate, kill_at=every)
    args = fit_args(stage, fragment, "--trainer.default_root_dir", str(tmp_path / "runs"), *more)
    ok(run([*args, "--run_name", "warmup", "--trainer.max_steps", "1"], tmp_path))  # builds caches once
    full = start([*args, "--run_name", "full"], tmp_path)
    killed = run([*fit_args(stage, kill, "--trainer.default_root_dir", str(tmp_path / "runs"), *more),
                  "--run_name", "killed"], tmp_path, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    stage_root = tmp_path / "runs" / stage
    saved = torch.load(stage_root / "killed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == every  # killed right after the first checkpoint, mid-epoch
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["consumed"] == every * accumulate
    assert full.wait(timeout=240) == 0, full.stdout.read()[-3000:]
    resumed = run([*args, "--ckpt_path", "last", "--run_name", "killed"], tmp_path, timeout=180)
    ok(resumed)
    assert "not resumable" not in resumed.stderr + resumed.stdout
    reference, interrupted = step_losses(stage_root / "full"), step_losses(stage_root / "killed")
    after = [s for s in interrupted if s >= every]
    assert len(reference) >= steps - 1 and len(after) >= steps - every - 1, (reference, interrupted)
    for step, losses in interrupted.items():
        assert losses[-1] == pytest.approx(reference[step][-1], abs=1e-5), (step, losses, reference[step])
    info = json.loads((stage_root / "killed" / "run.json").read_text())
    assert info["status"] == "finished" and info["global_step"] == steps


def test_sft_with_accumulation_resumes_exactly(tmp_path):
    _kill_and_resume(tmp_path, "sft", steps=7, every=3, accumulate=2)


def test_pretrain_resumes_exactly(tmp_path):
    _kill_and_resume(tmp_path, "pretrain", steps=6, every=2, accumulate=1)


@pytest.mark.slow
def test_dpo_resumes_exactly(tmp_path):
    _kill_and_resume(tmp_path, "dpo", steps=5, every=2, accumulate=2)


@pytest.mark.slow
def test_ddp_resumes_exactly(tmp_path):
    ddp = ("--config", str(CONFIGS / "fragments" / "ddp.yaml"), "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    _kill_and_resume(tmp_path, "sft", steps=5, every=2, accumulate=2, more=ddp)


def _lookahead(n_items: int, accumulate: int, seed: int = 3):
    from torch.utils.data import DataLoader

    from llmstages.data.loader import ResumableSampler, StepLookaheadLoader

    items = [{"k": torch.tensor([i]), "labels": torch.tensor([[-100] + [1] * (1 + i % 5)])} for i in range(n_items)]
    sampler = ResumableSampler(items, num_replicas=1, rank=0, shuffle=True, seed=seed)
    collate = lambda rows: {"k": torch.cat([r["k"] for r in rows]),  # noqa: E731
                            "labels": torch.nn.utils.rnn.pad_sequence([r["labels"][0] for r in rows], True, -100)}
    loader = DataLoader(items, batch_size=2, sampler=sampler, collate_fn=collate)
    count = lambda b: (int((b["labels"] != -100).sum()), len(b["k"]))  # noqa: E731
    return StepLookaheadLoader(loader, accumulate, count, sampler=sampler, batch_size=2), sampler


@pytest.mark.parametrize("consumed", [0, 3, 4, 5, 9])
def test_loader_resumes_anywhere_even_inside_an_accumulated_step(consumed):
    reference, sampler = _lookahead(40, accumulate=4)
    sampler.set_epoch(2)
    full = [(b["k"].tolist(), int(b["num_step_tokens"])) for b in reference]
    interrupted, sampler = _lookahead(40, accumulate=4)
    sampler.set_epoch(2)
    for _, batch in zip(range(consumed + 1), interrupted):  # one more than trained: Lightning's prefetch
        pass
    for _ in range(consumed):
        interrupted.mark_consumed()
    state = interrupted.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == consumed
    resumed, sampler = _lookahead(40, accumulate=4)
    resumed.load_state_dict(state)
    sampler.set_epoch(2)
    rest = [(b["k"].tolist(), int(b["num_step_tokens"])) for b in resumed]
    assert rest == full[consumed:]  # same batches, same whole-step token counts
    changed, _ = _lookahead(40, accumulate=2)
    if consumed:
        with pytest.raises(ValueError, match="accumulate: 4 -> 2"):
            changed.load_state_dict(state)
