"""SFTData: conversations -> chat template -> masked examples -> padded or packed rows.

Design choices:
- The loss mask is decided here, by the template and `loss_mask`
  (`llmstages.data.chat.loss_mask`); the stage only sums what is labelled.
- `packing: documents` bin-packs examples into rows (best-fit decreasing)
  with attention isolated per document; `none` pads one example per row.
- Validation conversations are kept as messages too, so the stage can ask
  the model their prompts (stop rate, exact match).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from rich.progress import track
from torch.utils.data import Dataset

from llmstages.data import synthetic
from llmstages.data.batch import LMBatch
from llmstages.data.base import ListDataset, StageData
from llmstages.data.formats import LoadReport, read_chat
from llmstages.data.packing import best_fit_decreasing, check_packing, fill_ratio, pack_examples, pad_examples, stack_rows, truncate
from llmstages.data.chat import resolve_template
from llmstages.options import ChatFormat, LossMask, OnError, TemplateName, Truncation, check_choice, choices


class SFTData(StageData):
    """Conversations -> chat template -> masked examples -> padded or packed rows."""

    def __init__(
        self,
        files: list[str] | None = None,
        format: ChatFormat = "auto",
        template: TemplateName = "chatml",
        loss_mask: LossMask = "assistant",
        packing: Literal["documents", "none"] = "documents",
        truncation: Truncation = "right",
        on_error: OnError = "raise",
        template_options: dict | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            files: chat data files (alpaca, sharegpt, messages; JSON, JSONL, Parquet or a datasets.save_to_disk folder);
                null: the embedded synthetic tasks.
            format: the files' format; auto detects it per file, from its first record with one format's keys
                (a later record of another format is an error).
            template: chatml, llama3, plain, or auto/hf: the tokenizer's own Jinja chat template (a model folder's);
                the chat template that renders conversations into tokens.
            loss_mask: which tokens carry a loss: assistant (every reply and its end-of-turn token), last_assistant,
                all (the prompt too), assistant_no_eos, legacy_drop_first (OpenRLHF #973), legacy_minimind.
            packing: documents (several examples per row, attention isolated) or none (one padded example per row).
            truncation: right (cut the end), left (cut the oldest context) or drop an over-long example.
            on_error: raise (stop at the first bad record, naming file, line and field) or skip (count and go on).
            template_options: for template auto/hf: date_string (pins Llama-3.1's date), dropped_system
                (error or warn when the template drops a system message), template_kwargs (e.g. enable_thinking).
        """
        super().__init__(**kwargs)
        self.files = [Path(f) for f in files] if files else None
        self.format = format
        self.loss_mask = check_choice("loss_mask", loss_mask, choices(LossMask))
        self.truncation = check_choice("truncation", truncation, choices(Truncation))
        self.on_error = check_choice("on_error", on_error, choices(OnError))
        self.template = resolve_template(template, self.tokenizer, **(template_options or {}))
        self.packing = check_packing(packing, ("none", "documents"))
        self.val_conversations: list[list[dict]] = []
        self.truncated = 0
        self.context_replies = 0

    def _conversations(self) -> tuple[list[list[dict]], list[LoadReport]]:
        return self.read_records(lambda file: read_chat(file, format=self.format, on_error=self.on_error),
                                 lambda: [c["messages"] for c in synthetic.sft_conversations(seed=self.seed)],
                                 "conversation")

    def encode(self, messages: list[dict], origin: str | None = None) -> dict | None:
        """One conversation -> a truncated example, or None (with the reason counted).
        `origin` (file and record) prefixes a template's error."""
        example = self.templated(origin, lambda: self.template.encode(messages, self.tokenizer, loss_mask=self.loss_mask))
        if example is None:
            return None
        fitted = truncate(example, self.seq_len, self.truncation)
        if fitted is None:
            self.skipped["too_long_dropped" if self.truncation == "drop" else "reply_truncated_away"] += 1
        elif fitted is not example:
            self.truncated += 1  # cut but still trained: reported, not a skip
        return fitted

    def _build(self) -> None:
        conversations, reports = self._conversations()
        self.truncated = 0
        pairs = []
        for k, messages in enumerate(track(conversations, description="encoding", disable=len(conversations) < 5000)):
            example = self.encode(messages, self._origins[k])
            if example is not None:
                pairs.append((messages, example))
        # OpenAI's `weight: 0`: replies kept as context, counted so the summary and `llmstages masks` show them
        self.context_replies = sum(1 for m, _ in pairs for x in m if x["role"] == "assistant" and x.get("weight", 1) == 0)
        self._report("sft data", len(pairs), reports)
        if self.context_replies:
            rank_zero_info(f"sft data: {self.context_replies} assistant replies have weight: 0 (context, not targets)")
        train, val = self._split(pairs)
        self.val_conversations = [m for m, _ in val]
        self.train_set = self._rows([e for _, e in train], "train")
        self.val_set = self._rows([e for _, e in val], "validation") if val else None

    def _rows(self, examples: list[dict], name: str) -> Dataset:
        if self.packing == "none":
            return ListDataset(examples)
        lengths = [len(e["input_ids"]) for e in examples]
        bins = best_fit_decreasing(lengths, self.seq_len)
        rows = [pack_examples(examples, b, self.seq_len, self.tokenizer.pad_id) for b in bins]
        rank_zero_info(
            f"sft {name}: {len(examples)} examples packed into {len(rows)} rows of {self.seq_len}, "
            f"{fill_ratio(bins, lengths, self.seq_len):.1%} real tokens"
            + (f" ({self.truncated} truncated)" if name == "train" and self.truncated else "")
        )
        self.fill_ratio = fill_ratio(bins, lengths, self.seq_len) if name == "train" else getattr(self, "fill_ratio", 0.0)
        return ListDataset(rows)

    def collate(self, items: list) -> LMBatch:
        if self.packing == "none":
            return pad_examples(items, self.tokenizer.pad_id)
        return stack_rows(items)

    def generation_prompts(self, n: int) -> list[tuple[list[int], str]]:
        """(prompt ids ending in the assistant header, expected reply) from validation conversations."""
        self.setup("validate")
        out = []
        for messages in self.val_conversations[:n]:
            if messages[-1]["role"] == "assistant":
                out.append((self.template.encode_prompt(messages[:-1], self.tokenizer), messages[-1]["content"]))
        return out

    @property
    def stop_token_id(self) -> int:
        return self.template.stop_token_id(self.tokenizer)
