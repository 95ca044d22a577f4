"""Streamed pretraining resumes exactly through the console entry point: a run SIGKILLed right after a
checkpoint and resumed with `--ckpt_path last` logs the same per-step losses as a run never interrupted
(two mixed sources, shuffled, across epoch boundaries; one process and 2 DDP gloo ranks); a resume with
another batch size or mixture is refused naming the values."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from clirun import CONFIGS, fit_args, ok, run, start, step_losses, tiny_fragment
from llmstages.data import synthetic
from llmstages.data.base import default_tokenizer
from llmstages.data.shards import prepare_shards

pytestmark = pytest.mark.distributed  # spawns processes

STAGE = "pretrain_stream"  # configs/pretrain_stream.yaml


def shard_sources(tmp_path, cache) -> dict:
    tokenizer = default_tokenizer(cache)
    docs = synthetic.pretrain_corpus(seed=11)
    out = {}
    for name, part in (("web", docs[:60]), ("code", docs[60:90])):
        text = tmp_path / f"{name}.txt"
        text.write_text("\n".join(part) + "\n")
        out[name] = str(prepare_shards([text], tokenizer, tmp_path / "shards" / name, shard_tokens=500, workers=1,
                                       progress=False))
    return out


def stream_fragment(tmp_path, cache, sources, *, steps, every, accumulate, kill_at=None, weights=None):
    data = {"sources": sources, "weights": weights or {"web": 0.75, "code": 0.25}, "shuffle_buffer": 4,
            "val_fraction": 0.0}
    return tiny_fragment(tmp_path, cache, stage=STAGE, steps=steps, every=every, accumulate=accumulate,
                         kill_at=kill_at, extra={"data": {"init_args": data}})


def kill_and_resume(tmp_path, steps: int, every: int, accumulate: int, more: tuple[str, ...] = (),
                    kills: tuple[int, ...] | None = None):
    """An uninterrupted run, and one SIGKILLed right after the checkpoint of each step in `kills` (each
    later kill in the resumed run: a second resume must not restart the stream), then resumed to the end."""
    kills = kills or (every,)
    cache = tmp_path / "cache"
    sources = shard_sources(tmp_path, cache)
    fragment = stream_fragment(tmp_path, cache, sources, steps=steps, every=every, accumulate=accumulate)
    root = ("--trainer.default_root_dir", str(tmp_path / "runs"))
    args = fit_args(STAGE, fragment, *root, *more)
    full = start([*args, "--run_name", "full"], tmp_path)
    stage_root = tmp_path / "runs" / "pretrain"
    for attempt, kill_at in enumerate(kills):
        kill = stream_fragment(tmp_path, cache, sources, steps=steps, every=every, accumulate=accumulate,
                               kill_at=kill_at)
        resume = ("--ckpt_path", "last") if attempt else ()
        killed = run([*fit_args(STAGE, kill, *root, *more), *resume, "--run_name", "killed"], tmp_path, timeout=240)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        saved = torch.load(stage_root / "killed" / "checkpoints" / "last.ckpt", weights_only=False)
        assert saved["global_step"] == kill_at
        loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
        assert loader_state["weights"] == {"web": "3/4", "code": "1/4"}
    assert full.wait(timeout=300) == 0, full.stdout.read()[-3000:]
    resumed = run([*args, "--ckpt_path", "last", "--run_name", "killed"], tmp_path, timeout=240)
    ok(resumed)
    reference, interrupted = step_losses(stage_root / "full"), step_losses(stage_root / "killed")
    assert len(reference) >= steps - 1 and len([s for s in interrupted if s >= kills[-1]]) >= steps - kills[-1] - 1
    for step, losses in interrupted.items():
        assert losses[-1] == pytest.approx(reference[step][-1], abs=1e-5), (step, losses, reference[step])
    info = json.loads((stage_root / "killed" / "run.json").read_text())
    assert info["status"] == "finished" and info["global_step"] == steps


def test_streamed_pretraining_resumes_exactly_and_refuses_another_mixture(tmp_path):
    # 40 rows (5 steps) per epoch: both kills land mid-epoch, the run crosses into epoch 2 and the code source
    # (15 rows, 10 per epoch) into its second pass
    kill_and_resume(tmp_path, steps=7, every=2, accumulate=2, kills=(2, 4))  # killed twice, resumed twice
    cache = tmp_path / "cache"
    sources = {"web": str(tmp_path / "shards" / "web"), "code": str(tmp_path / "shards" / "code")}
    other = stream_fragment(tmp_path, cache, sources, steps=9, every=4, accumulate=2, weights={"web": 0.5, "code": 0.5})
    refused = run([*fit_args(STAGE, other, "--trainer.default_root_dir", str(tmp_path / "runs")),
                   "--ckpt_path", "last", "--run_name", "killed", "--data.init_args.batch_size", "2"], tmp_path,
                  timeout=240)
    assert refused.returncode == 2, refused.stderr[-3000:]
    message = refused.stderr.strip().splitlines()[-1]
    assert "batch_size: 4 -> 2" in message and "'web': '3/4'" in message and "'web': '1/2'" in message, message


@pytest.mark.slow
def test_streamed_pretraining_resumes_exactly_on_two_ddp_ranks(tmp_path):
    ddp = ("--config", str(CONFIGS / "fragments" / "ddp.yaml"), "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    kill_and_resume(tmp_path, steps=5, every=2, accumulate=2, more=ddp)
