"""PromptData: prompts only, for online RL (GRPO); the policy writes the replies.

Design choices:
- Sources are read by `formats.read_prompts`: the chat formats (alpaca, sharegpt, messages),
  each conversation cut before its final assistant turn, whose content becomes the prompt's
  reference `answer`; or `{"prompt", "answer"}` records (`prompt` a string or a message list
  ending with a user turn; optional `answer`, `system`, `task`); or one prompt per line
  (`lines`, the generate tool's files). Bad records follow `on_error` with the file, line
  and field named, as every reader in `formats` does. Default: the embedded synthetic tasks
  (`synthetic.sft_conversations` cut before the final reply; the reply is the checkable answer).
- Prompts are encoded with the template's `encode_prompt` (the conversation so far plus the
  assistant header), the same path SFT evaluation uses; a prompt longer than
  `max_prompt_len` keeps its last tokens (`truncation: left`) or is dropped (`drop`), counted.
- A micro-batch is a list of prompts, not a padded tensor: the stage generates from each, then
  builds the `prompt + completion` rows itself (`completion_rows`, right padding, labels on the
  completion only, the batch contract of `data/batch.py`).
- GRPO's step normalisation needs every completion of the optimiser step before the step's
  first backward, and completions exist only once generated. `GenerationStepLoader` therefore
  hands each micro-batch the prompts of its whole step (`step_prompts`) and its position in it
  (`micro_index`, `iteration`); the stage generates for the whole step at position (0, 0).
  With `num_iterations > 1` the step's micro-batches are yielded again (TRL's reuse of one
  generation batch for several updates), so Lightning's accumulation still sees a plain stream.
- Shards are disjoint per rank (`DistributedSampler`, padded to equal length), so every rank
  generates for its own prompts, the same number of them (FSDP needs equal forward counts).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import torch

from llmstages.data import synthetic
from llmstages.data.base import ListDataset, StageData, batch_limit
from llmstages.data.batch import LMBatch
from llmstages.data.chat import resolve_template
from llmstages.data.formats import LoadReport, PromptFormat, PromptRecord, prompt_record, read_prompts
from llmstages.data.loader import ResumableSampler, StepLookaheadLoader
from llmstages.losses import IGNORE_INDEX
from llmstages.options import OnError, TemplateName, check_choice, choices

__all__ = ["PromptData", "GenerationStepLoader", "completion_rows"]

PromptTruncation = Literal["left", "drop"]


def completion_rows(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, min_width: int = 0
) -> LMBatch:
    """Right-padded `prompt + completion` rows; labels mark the completion's tokens only.

    `completions[i]` is the whole scored completion (its end-of-turn token included when it
    stopped). A row with an empty completion has no labelled token.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    width = max([len(p) + len(c) for p, c in zip(prompts, completions)] + [min_width, 1])
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        sequence = list(prompt) + list(completion)
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        if completion:
            labels[row, len(prompt) : len(sequence)] = torch.tensor(completion, dtype=torch.long)
    positions = torch.arange(width).expand(len(prompts), width).clone()
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


class GenerationStepLoader(StepLookaheadLoader):
    """Micro-batches of prompts, each told the prompts of its whole optimiser step (see the module docstring).

    Resumable mid-epoch like every training loader (`StepLookaheadLoader`'s state): a resumed
    epoch starts the sampler at its interrupted generation batch and yields from the first
    micro-batch not yet trained.
    """

    def __init__(
        self, loader: Iterable[dict], accumulate: int, num_iterations: int = 1, limit: int | None = None,
        sampler: ResumableSampler | None = None, batch_size: int | None = None,
    ) -> None:
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        self.num_iterations = num_iterations
        super().__init__(loader, accumulate, count=None, limit=limit, sampler=sampler, batch_size=batch_size)

    def __len__(self) -> int:
        n = len(self.loader) * self.num_iterations  # type: ignore[arg-type]
        return n if self.limit is None else min(n, self.limit)

    def _order(self) -> dict:
        return {**super()._order(), "num_iterations": self.num_iterations}

    def __iter__(self) -> Iterator[dict]:
        start = self._begin_epoch()
        span = self.accumulate * self.num_iterations  # what one generation batch yields
        first = start - start % span
        if first:
            self.sampler.start = first // self.num_iterations * self.batch_size
        return itertools.islice(self._steps(first), start - first, None)

    def _steps(self, yielded: int) -> Iterator[dict]:
        source = iter(self.loader)
        while True:
            step = list(itertools.islice(source, self.accumulate))
            if not step:
                return
            for iteration in range(self.num_iterations):
                for index, batch in enumerate(step):
                    if self.limit is not None and yielded >= self.limit:
                        return
                    yield {**batch, "step_prompts": step, "micro_index": index, "iteration": iteration}
                    yielded += 1


class PromptData(StageData):
    """Prompts (with optional reference answers) -> micro-batches of token-id lists for online RL."""

    left_truncated = 0  # prompts cut on the left to max_prompt_len (counted, reported, and flagged per prompt)

    def __init__(
        self,
        files: list[str] | None = None,
        format: PromptFormat = "auto",
        template: TemplateName = "chatml",
        max_prompt_len: int = 192,
        truncation: PromptTruncation = "left",
        num_prompts: int = 2000,
        on_error: OnError = "raise",
        template_options: dict | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            files: prompt files: `{"prompt", "answer"}` records, or alpaca / sharegpt / messages conversations
                (cut before their final assistant turn, which becomes the answer); JSON, JSONL, Parquet or a
                datasets.save_to_disk folder; null: the embedded synthetic tasks.
            format: prompt (records with a `prompt` field), a chat format, lines (one prompt per line, as
                `llmstages generate --prompts` reads), or auto (per file: `prompt` records when the first record
                has a `prompt` field, else the chat formats' own detection).
            template: the chat template whose `encode_prompt` renders a prompt (ends with the assistant header).
            max_prompt_len: prompt tokens kept at most.
            truncation: left (keep a long prompt's last tokens) or drop it (counted).
            num_prompts: how many embedded synthetic prompts (when `files` is null).
            on_error: raise (stop at the first bad record, naming file, line and field) or skip (count and go on).
            template_options: for template auto/hf: date_string, dropped_system, template_kwargs (e.g.
                enable_thinking: false writes Qwen3's empty think block into every prompt).
        """
        super().__init__(**kwargs)
        self.files = [Path(f) for f in files] if files else None
        self.format = check_choice("format", format, choices(PromptFormat))
        self.truncation = check_choice("truncation", truncation, choices(PromptTruncation))
        self.on_error = check_choice("on_error", on_error, choices(OnError))
        if max_prompt_len < 1 or num_prompts < 1:
            raise ValueError(f"max_prompt_len and num_prompts must be >= 1, got {max_prompt_len}, {num_prompts}")
        # named, or auto/hf: the tokenizer's own
        self.template = resolve_template(template, self.tokenizer, **(template_options or {}))
        self.max_prompt_len, self.num_prompts = max_prompt_len, num_prompts
        self.num_iterations = 1  # set by the stage (GRPOModule.num_iterations) before the loaders are built

    # ----------------------------------------------------------------- reading

    def _records(self) -> tuple[list[PromptRecord], list[LoadReport]]:
        return self.read_records(
            lambda file: read_prompts(file, format=self.format, on_error=self.on_error),
            lambda: [prompt_record(c["messages"], task=c["task"])
                     for c in synthetic.sft_conversations(n=self.num_prompts, seed=self.seed)],
            "prompt")

    def encode(self, record: PromptRecord, origin: str | None = None) -> dict | None:
        """A prompt record -> its prompt ids (cut or dropped at max_prompt_len), or None (counted).
        `origin` (file and record) prefixes a template's error."""
        ids = self.templated(origin, lambda: self.template.encode_prompt(record["messages"], self.tokenizer))
        if ids is None:
            return None
        if len(ids) > self.max_prompt_len:
            if self.truncation == "drop":
                self.skipped["prompt_too_long_dropped"] += 1
                return None
            self.truncated += 1
            return {"prompt_ids": ids[-self.max_prompt_len :], "answer": record.get("answer"), "task": record.get("task"),
                    "messages": record["messages"], "truncated": True}
        return {"prompt_ids": ids, "answer": record.get("answer"), "task": record.get("task"),
                "messages": record["messages"], "truncated": False}

    _truncation_reason = "prompt_truncated"

    def _build(self) -> None:
        records, reports = self._records()
        self.truncated = 0
        items = [e for e in (self.encode(r, self._origins[k]) for k, r in enumerate(records)) if e is not None]
        self._report("prompt data", len(items), reports)
        train, val = self._split(items)
        for i, item in enumerate(train):
            item["index"] = i
        for i, item in enumerate(val):
            item["index"] = i
        self.train_set = ListDataset(train)
        self.val_set = ListDataset(val) if val else None

    def collate(self, items: list[dict]) -> dict:
        return {
            "prompt_ids": [item["prompt_ids"] for item in items],
            "answers": [item["answer"] for item in items],
            "tasks": [item["task"] for item in items],
            "truncated": [item.get("truncated", False) for item in items],
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        }

    def train_dataloader(self) -> GenerationStepLoader:
        self.setup("fit")
        loader = self._loader(self.train_set, self.shuffle)
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        limit = batch_limit(trainer, len(loader) * self.num_iterations)
        wrapped = GenerationStepLoader(loader, accumulate, self.num_iterations, limit,
                                       sampler=loader.sampler, batch_size=self.batch_size)  # set_epoch goes through it
        self._train_loader = wrapped  # told of each micro-batch training takes (StageData.on_before_batch_transfer)
        return wrapped

    # ----------------------------------------------------------------- what the stage asks

    def generation_prompts(self, n: int) -> list[tuple[list[int], str]]:
        """(prompt ids, reference answer) of up to `n` validation prompts that have an answer."""
        self.setup("validate")
        out = [(item["prompt_ids"], item["answer"]) for item in (self.val_set or []) if item["answer"] is not None]
        return out[:n]

    @property
    def stop_token_id(self) -> int:
        return self.template.stop_token_id(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

