"""One GRPO optimiser step on 2 CPU processes (gloo), DDP or FSDP2; run by tests/test_grpo.py.

Lightning's subprocess launcher re-runs this script for rank 1, so it is a plain script.
Usage: grpo_step.py OUT CACHE STRATEGY AGGREGATION. Each rank holds 2 prompts (2 micro-batches
of 1 prompt x 2 completions); rank 0 writes the step's (gathered) gradients and counts to OUT.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the reward function lives in tests/test_grpo.py

from llmstages.data import PromptData  # noqa: E402
from llmstages.stages import GRPOModule  # noqa: E402
from llmstages.strategies import FSDP2Strategy  # noqa: E402

from grad_capture import FirstStepGrads  # noqa: E402  (tests/scripts, this script's folder)


def main(out: str, cache: str, strategy: str, aggregation: str) -> None:
    torch.set_num_threads(1)
    data = PromptData(cache_dir=cache, batch_size=1, shuffle=False, num_prompts=8, val_fraction=0.0, max_prompt_len=64)
    model = GRPOModule(preset="tiny", vocab_size=data.vocab_size, group_size=2, max_completion_length=6,
                       reward="test_grpo:token_reward", loss_aggregation=aggregation)
    model.load_state_dict(torch.load(f"{cache}/grpo_init.pt"), strict=True)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy() if strategy == "fsdp" else "ddp",
        max_steps=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
        callbacks=[FirstStepGrads(out, prefix="backbone.", extra=lambda module: {
            "step_tokens": module._rollout.step_tokens, "step_completions": module._rollout.step_completions})],
    )
    trainer.fit(model, data)
    # validation generates on every rank (FSDP2 all-gathers in each forward: a rank-zero-only one would hang)
    held_out = PromptData(cache_dir=cache, batch_size=1, num_prompts=8, val_fraction=0.5, max_prompt_len=64)
    metrics = trainer.validate(model, held_out, verbose=False)[0]
    if trainer.is_global_zero:
        torch.save({**torch.load(out, weights_only=False), "val_stop_rate": metrics["val/stop_rate"]}, out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
