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


def _interrupt(loader, sampler, *, epoch: int, consumed: int) -> dict:
    """The loader's checkpoint state after training took `consumed` micro-batches of `epoch`
    (Lightning has fetched one more: its prefetch)."""
    sampler.set_epoch(epoch)
    for _, _batch in zip(range(consumed + 1), loader):
        pass
    for _ in range(consumed):
        loader.mark_consumed()
    return loader.state_dict()


@pytest.mark.parametrize("consumed", [0, 3, 4, 5, 9])
def test_loader_resumes_anywhere_even_inside_an_accumulated_step(consumed):
    reference, sampler = _lookahead(40, accumulate=4)
    sampler.set_epoch(2)
    full = [(b["k"].tolist(), int(b["num_step_tokens"])) for b in reference]
    state = _interrupt(*_lookahead(40, accumulate=4), epoch=2, consumed=consumed)
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


def _generation_loader(n_items: int, accumulate: int, num_iterations: int, seed: int = 3):
    from torch.utils.data import DataLoader

    from llmstages.data.loader import ResumableSampler
    from llmstages.data.prompts import GenerationStepLoader

    items = list(range(n_items))
    sampler = ResumableSampler(items, num_replicas=1, rank=0, shuffle=True, seed=seed)
    loader = DataLoader(items, batch_size=2, sampler=sampler, collate_fn=lambda rows: {"prompt_ids": rows})
    return GenerationStepLoader(loader, accumulate, num_iterations, sampler=sampler, batch_size=2), sampler


@pytest.mark.parametrize("consumed", [0, 2, 3, 4, 7, 9])
def test_prompt_loader_resumes_anywhere_even_inside_a_reused_generation_batch(consumed):
    """GRPO's loader (accumulation 2, each generation batch used for 2 updates): a resume after any
    number of trained micro-batches yields exactly what an uninterrupted epoch would have yielded next."""
    def view(batches):
        return [(b["prompt_ids"], b["micro_index"], b["iteration"], b["step_prompts"]) for b in batches]

    reference, sampler = _generation_loader(24, 2, 2)
    sampler.set_epoch(1)
    full = view(reference)
    state = _interrupt(*_generation_loader(24, 2, 2), epoch=1, consumed=consumed)
    resumed, sampler = _generation_loader(24, 2, 2)
    resumed.load_state_dict(state)
    sampler.set_epoch(1)
    assert view(resumed) == full[consumed:]
    if consumed:
        with pytest.raises(ValueError, match="num_iterations: 2 -> 1"):
            _generation_loader(24, 2, 1)[0].load_state_dict(state)


def test_grpo_reusing_its_generation_batch_resumes_exactly(tmp_path):
    """num_iterations 2: the kill lands between the two updates of one generation batch; the checkpoint
    carries that batch, so the resumed update trains on the same completions."""
    init = tmp_path / "init.ckpt"
    sft = tiny_fragment(tmp_path, tmp_path / "cache", stage="sft", steps=30)
    ok(run([*fit_args("sft", sft, "--trainer.default_root_dir", str(tmp_path / "runs")), "--run_name", "init"], tmp_path))
    (tmp_path / "runs" / "sft" / "init" / "checkpoints" / "last.ckpt").rename(init)
    grpo = {"model": {"init_args": {"preset": "tiny", "group_size": 4, "max_completion_length": 8, "reward": "length",
                                    "init_from": str(init), "num_iterations": 2, "warmup_steps": 1}},
            "data": {"init_args": {"max_prompt_len": 48, "num_prompts": 64, "batch_size": 2}}}
    steps, every = 5, 3  # after 3 steps: between the two updates of the generation batch of steps 2 and 3
    fragment = tiny_fragment(tmp_path, tmp_path / "cache", stage="grpo", steps=steps, every=every, extra=grpo)
    kill = tiny_fragment(tmp_path, tmp_path / "cache", stage="grpo", steps=steps, every=every, extra=grpo, kill_at=every)
    root = ("--trainer.default_root_dir", str(tmp_path / "runs"))
    ok(run([*fit_args("grpo", fragment, *root), "--run_name", "full"], tmp_path, timeout=180))
    killed = run([*fit_args("grpo", kill, *root), "--run_name", "killed"], tmp_path, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ok(run([*fit_args("grpo", fragment, *root), "--ckpt_path", "last", "--run_name", "killed"], tmp_path, timeout=180))
    stage_root = tmp_path / "runs" / "grpo"
    reference, interrupted = step_losses(stage_root / "full", "train/step_loss"), step_losses(stage_root / "killed", "train/step_loss")
    assert sorted(reference) == list(range(steps)) and sorted(interrupted) == list(range(steps)), (reference, interrupted)
    for step in range(every, steps):
        assert interrupted[step][-1] == pytest.approx(reference[step][-1], rel=1e-6, abs=1e-9), step
