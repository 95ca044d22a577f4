"""GRPO's rollout pieces: sample groups, score them, lay them out as the step's micro-batches.

Design choices:
- `sample_completions` is the one place GRPO generates: a prompt's group as one batch through
  the KV cache, with one generator per prompt so a group is the same on whichever rank samples it.
- A completion that stopped is scored with its end-of-turn token (`scored_ids`), which is then
  trained (the policy learns to stop), as TRL's completion mask includes the EOS token.
- A micro-batch keeps only the completions that train (`keep`); one left without any keeps a
  single masked row (`MicroBatch.placeholder`), so every rank still runs the same forwards and
  the loss is a zero in the graph.
- The stage (`stage.GRPOModule.rollout`) strings these together; everything that needs the
  policy, the reference or the ranks (log-probs, counts summed over ranks) stays there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from llmstages.data.prompts import completion_rows
from llmstages.model.generate import generate_batch
from llmstages.stages.grpo.rewards import Completions

__all__ = ["MicroBatch", "Rollout", "Sampled", "sample_completions", "sample_groups", "scored_ids", "rollout_stats",
           "completion_micro_batch", "reward_metric_name"]


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: list[int],
    group_size: int,
    max_new_tokens: int,
    stop_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    fixed_steps: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
) -> list[tuple[list[int], bool]]:
    """`group_size` sampled continuations of one prompt: (tokens without the stop token, stopped)."""
    return generate_batch(
        model, [prompt_ids] * group_size, max_new_tokens, stop_ids=[stop_id], temperature=temperature,
        top_k=top_k, top_p=top_p, generator=generator, fixed_steps=fixed_steps,
    )


@dataclass
class MicroBatch:
    """One micro-batch's completions as rows, with what the loss needs from the rollout."""

    rows: dict[str, Tensor]  # input_ids, labels, position_ids (labels: the scored completion tokens)
    advantages: Tensor  # [B]
    old_logps: Tensor | None  # [B, T] aligned with rows (num_iterations > 1)
    ref_logps: Tensor | None  # [B, T] (beta > 0)
    num_completions: int  # real completions (0 for the placeholder row of an emptied micro-batch)


@dataclass
class Rollout:
    """The generation batch of one optimiser step (this rank's part) and the step's global counts."""

    micro_batches: list[MicroBatch]
    step_tokens: int  # completion tokens carrying a loss, summed over micro-batches and ranks
    step_completions: int  # completions trained on (after filter_zero_advantage), summed over micro-batches and ranks
    stats: dict[str, float]
    samples: list[dict]


@dataclass
class Sampled:
    """Every completion of one step, group after group, with its prompt's answer and task."""

    prompt_ids: list[list[int]]
    answers: list[str | None]
    tasks: list[str | None]
    completion_ids: list[list[int]]
    stopped: list[bool]
    seconds: float

    def completions(self, tokenizer, max_completion_length: int, stop_id: int, group_size: int = 1) -> Completions:
        """What the reward functions are asked about (decoded text, special tokens skipped)."""
        return Completions(
            prompts=[tokenizer.decode(p) for p in self.prompt_ids],
            completions=[tokenizer.decode(t, skip_special_tokens=True) for t in self.completion_ids],
            completion_ids=self.completion_ids, stopped=self.stopped, answer=self.answers, task=self.tasks,
            prompt_ids=self.prompt_ids, max_completion_length=max_completion_length, stop_id=stop_id,
            group_size=group_size,
        )


@torch.no_grad()
def sample_groups(model, step_prompts: Sequence[dict], group_size: int, generator_for, **sampling) -> Sampled:
    """Sample `group_size` completions of every prompt of the step (`sampling`: `sample_completions`' options).

    `generator_for(index)` seeds the group of the prompt with data index `index`.
    """
    started = time.perf_counter()
    prompts, answers, tasks, completions, stopped = [], [], [], [], []
    for micro in step_prompts:
        for ids, answer, task, index in zip(micro["prompt_ids"], micro["answers"], micro["tasks"], micro["index"].tolist()):
            group = sample_completions(model, ids, group_size, generator=generator_for(index), **sampling)
            prompts += [ids] * group_size
            answers += [answer] * group_size
            tasks += [task] * group_size
            completions += [tokens for tokens, _ in group]
            stopped += [s for _, s in group]
    return Sampled(prompts, answers, tasks, completions, stopped, time.perf_counter() - started)


def scored_ids(sampled: Sampled, stop_id: int) -> list[list[int]]:
    """Each completion as it is scored and trained: with its end-of-turn token when it stopped."""
    return [ids + [stop_id] if s else ids for ids, s in zip(sampled.completion_ids, sampled.stopped)]


def completion_micro_batch(
    rows: dict[str, Tensor], advantages: Tensor, keep: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None
) -> MicroBatch:
    """The rows (and their log-probs) of the completions in `keep`; one masked placeholder row if none is kept."""
    if not bool(keep.any()):  # one masked row keeps this micro-batch's forward (and its zero loss)
        keep = torch.zeros_like(keep)
        keep[0] = True
        rows["labels"][0] = -100
        advantages = torch.zeros_like(advantages)
        count = 0
    else:
        count = int(keep.sum())
    select = lambda t: None if t is None else t[keep]  # noqa: E731
    return MicroBatch({k: v[keep] for k, v in rows.items()}, advantages[keep], select(old_logps), select(ref_logps), count)


def truncation_masked_rows(prompts, scored, stopped, pad_id: int, mask_truncated: bool) -> dict[str, Tensor]:
    """Prompt + completion rows; with `mask_truncated`, completions that never stopped carry no label (DAPO)."""
    rows = completion_rows(prompts, scored, pad_id)
    if mask_truncated:
        rows["labels"][~torch.tensor(stopped, dtype=torch.bool)] = -100
    return rows


def rollout_stats(
    rewards: Tensor, per_function: Tensor, names: Sequence[str], group_size: int, scored: list[list[int]],
    stopped: list[bool], zero_std: Tensor, generation_seconds: float,
) -> dict[str, float]:
    """What a rollout logs: rewards (total, per function), completion lengths, stop rate, zero-advantage groups."""
    lengths = torch.tensor([len(s) for s in scored], dtype=torch.float64)
    scorable = ~rewards.isnan()  # NaN: unscorable (reward_errors: exclude), left out of every reward statistic
    grouped = rewards.view(-1, group_size)
    group_stds = [g[~g.isnan()].std() for g in grouped if int((~g.isnan()).sum()) > 1]
    stats = {
        "reward": float(rewards[scorable].mean()) if bool(scorable.any()) else float("nan"),
        "reward_std": float(torch.stack(group_stds).mean()) if group_stds else 0.0,
        "unscorable": float((~scorable).sum()),
        "completion_length": float(lengths.mean()),
        "completion_length_min": float(lengths.min()),
        "completion_length_max": float(lengths.max()),
        "stop_rate": float(torch.tensor(stopped, dtype=torch.float64).mean()),
        "zero_advantage_fraction": float(zero_std.double().mean()),
        "generation_seconds": generation_seconds,
    }
    for name, column in zip(names, per_function.T):
        finite = column[~column.isnan()]
        stats[f"rewards/{reward_metric_name(name)}"] = float(finite.mean()) if finite.numel() else float("nan")
    return stats


def reward_metric_name(reward: str) -> str:
    """A logging-safe name for a reward (an import path keeps its function name)."""
    return reward.rpartition(":")[2] if ":" in reward else reward
