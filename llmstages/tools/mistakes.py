"""A model's own mistakes on checkable prompts: preference pairs for DPO and its weakest tasks for GRPO.

The demo's step between SFT and DPO/GRPO ("learns from its mistakes").

Design choices:
- Prompts come from synthetic's `tuning` stream, never from the `eval` stream the demo reports on,
  so nothing chosen here (which pairs, which tasks) is chosen on the reported prompts.
- Replies are greedy and scored by `evaluation.evaluate_replies` (batches of prompts through the
  KV cache; `data.answers.exact_match`, the definition validation and GRPO's reward use); the
  demo's held-out scoring is this same function on the `eval` stream.
- A wrong, non-empty reply becomes a pair: chosen = the right answer, rejected = the model's own
  wrong reply, in the prompt/chosen/rejected record format `PreferenceData` reads. So DPO's pairs
  encode exactly the behaviour it should raise: answering right where this model answers wrong.
- `ranking_accuracy` measures the behaviour the pairs encode on pairs built the same way from
  *held-out* prompts: how often a model ranks the right answer above the SFT model's own wrong
  one (a policy by the summed log-probability of the reply tokens it would generate, end-of-turn
  included; a reward model by its reward). That is what DPO optimises and the reward model is
  trained to do, measured where neither trained; greedy exact match is the stricter test.
- GRPO's tasks: the lowest per-task accuracy among tasks the model gets right at least
  `min_accuracy` of the time (a task it never gets right gives a group no reward to compare);
  when no task is (a smoke run's barely trained model), the demo gives GRPO every task.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmstages.data import synthetic
from llmstages.evaluation import evaluate_replies
from llmstages.losses import IGNORE_INDEX, sequence_logps, token_logps_from_logits

__all__ = ["Mistakes", "find_mistakes", "mistake_pair", "ranking_accuracy", "policy_logps", "weakest_tasks",
           "write_jsonl", "grpo_prompt_records"]


@dataclass
class Mistakes:
    """Greedy replies to checkable prompts: pairs built from the wrong ones, accuracy per task, stop rate."""

    pairs: list[dict] = field(default_factory=list)
    correct: dict[str, int] = field(default_factory=dict)
    asked: dict[str, int] = field(default_factory=dict)
    stop_rate: float = 0.0

    def accuracy(self) -> dict[str, float]:
        return {task: self.correct[task] / self.asked[task] for task in self.asked}

    def overall(self) -> float:
        return sum(self.correct.values()) / max(1, sum(self.asked.values()))


def find_mistakes(
    model, tokenizer, template, items: Sequence[tuple[list[dict], str, str]], max_new_tokens: int = 24,
    batch_size: int = 64,
) -> Mistakes:
    """Answer every `(messages, answer, task)` greedily (`evaluation.evaluate_replies`); count the right
    ones per task, and turn each wrong non-empty reply into a preference pair."""
    prompts = [template.encode_prompt(messages, tokenizer) for messages, _, _ in items]
    quality = evaluate_replies(model, prompts, [answer for _, answer, _ in items], template.stop_token_id(tokenizer),
                               tokenizer, max_new_tokens, batch_size=batch_size)
    found = Mistakes(stop_rate=quality["stop_rate"])
    for (messages, answer, task), sample in zip(items, quality["samples"]):
        found.asked[task] = found.asked.get(task, 0) + 1
        found.correct[task] = found.correct.get(task, 0) + sample["exact_match"]
        pair = None if sample["exact_match"] else mistake_pair(messages, answer, sample["reply"])
        if pair is not None:
            found.pairs.append(pair)
    return found


def mistake_pair(messages: list[dict], answer: str, reply: str) -> dict | None:
    """The preference record for a wrong reply (right answer chosen, the reply rejected); None for an
    empty reply or one equal to the answer (it did not stop: nothing to compare)."""
    reply = reply.strip()
    if not reply or reply == answer:
        return None
    return {"prompt": messages, "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": reply}]}


Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids [B, T], labels [B, T]) -> [B]


def policy_logps(model) -> Score:
    """A policy's summed log-probability of each row's labelled tokens (the reply it would generate)."""

    def score(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        device = model.output_weight.device
        input_ids, labels = input_ids.to(device), labels.to(device)
        return sequence_logps(token_logps_from_logits(model(input_ids), labels), labels, "sum")

    return score


@torch.no_grad()
def ranking_accuracy(score: Score, pairs: Sequence[dict], tokenizer, template, batch_size: int = 64) -> float:
    """The fraction of `pairs` whose chosen side `score` rates strictly above the rejected side.

    Each side is the template's prompt + reply tokens, the reply labelled; rows are right-padded
    (labels ignored there), which a causal model's earlier positions never see."""
    if not pairs:
        raise ValueError("ranking_accuracy needs at least one pair")
    rows = []
    for pair in pairs:
        prompt, sides = template.encode_pair(pair["prompt"], {s: pair[s] for s in ("chosen", "rejected")}, tokenizer)
        for side in ("chosen", "rejected"):
            rows.append((prompt + sides[side]["input_ids"], [IGNORE_INDEX] * len(prompt) + sides[side]["labels"]))
    wins = 0
    for start in range(0, len(rows), 2 * batch_size):
        chunk = rows[start : start + 2 * batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([ids + [tokenizer.pad_id] * (width - len(ids)) for ids, _ in chunk])
        labels = torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels in chunk])
        chosen, rejected = score(ids, labels).view(-1, 2).unbind(1)
        wins += int((chosen > rejected).sum())
    return wins / len(pairs)


def weakest_tasks(accuracy: dict[str, float], count: int, min_accuracy: float) -> list[str]:
    """The `count` tasks of lowest accuracy among those at or above `min_accuracy` (ties: task order); [] if none is."""
    climbable = [task for task, value in accuracy.items() if value >= min_accuracy]
    return sorted(climbable, key=lambda task: accuracy[task])[:count]


def grpo_prompt_records(tasks: Sequence[str], n: int, seed: int) -> list[dict]:
    """`n` single-turn `{"prompt", "answer", "task"}` records of `tasks` (synthetic's SFT stream), as PromptData reads."""
    conversations = synthetic.sft_conversations(n, seed=seed, multi_turn_fraction=0.0, tasks=tasks)
    return [{"prompt": c["messages"][:-1], "answer": c["answer"], "task": c["task"]} for c in conversations]


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
