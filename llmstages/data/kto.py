"""KTOData: unpaired prompt + completion examples labelled desirable or undesirable, each with a mismatched KL row.

Design choices:
- Records: `{"prompt", "completion", "label"}`, or preference pairs unpaired into one desirable and one
  undesirable example each (`formats.read_kto`); null files: the embedded preference pairs, unpaired.
  Masks and templates as for preference data (the completion is labelled as a reply), truncation
  as for SFT rows (`right`, `left`: the oldest prompt tokens, `drop`).
- KTO's reference point z0 needs completions paired with a prompt they do not answer. The pairing
  is fixed per example, within its split, when the data is built: example i's KL row is its own
  prompt followed by the completion of the nearest earlier example with another prompt (TRL's
  cycle by one, over the whole split instead of within a micro-batch, skipping the same prompt's
  other completion that unpaired preference data puts next to it). So it does not depend on the order, the micro-batch size or the
  ranks: shuffling is allowed, and a stage can average z0 over any scope of examples. A split whose
  examples all share one prompt has no mismatched pair; its row is marked `kl_valid = False` (never a NaN downstream).
- Training batches carry their whole optimiser step's KL rows (`step_kl_*`, this rank's micro-batches
  of the step), attached by `KLStepLoader`, so the stage can average z0 over the step before the
  step's first backward, the way the loader attaches the step's token counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from llmstages.data import synthetic
from llmstages.data.base import ListDataset, StageData
from llmstages.data.chat import resolve_template
from llmstages.data.formats import KTOExample, LoadReport, read_kto
from llmstages.data.loader import StepLookaheadLoader
from llmstages.data.packing import pad_examples, truncate
from llmstages.losses import IGNORE_INDEX, count_targets
from llmstages.options import OnError, TemplateName, Truncation, check_choice, choices

__all__ = ["KTOData", "KLStepLoader", "KL_KEYS", "unpair", "mismatched_partner"]

KL_KEYS = ("input_ids", "labels", "position_ids")  # the keys of a KL row: kl_<key>, step_kl_<key>


def unpair(pairs: list[dict]) -> list[KTOExample]:
    """Preference pairs -> a desirable (chosen) and an undesirable (rejected) example each (TRL's unpair)."""
    return [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")]


def mismatched_partner(encoded: list[dict], i: int) -> int | None:
    """The nearest earlier example (cyclically) whose prompt differs from example i's, or None.

    Unpaired preference data puts a prompt's two completions next to each other: the previous example
    can answer the same prompt, which would be a matched pair, not a mismatched one.
    """
    for step in range(1, len(encoded)):
        j = (i - step) % len(encoded)
        if encoded[j]["prompt"] != encoded[i]["prompt"]:
            return j
    return None


class KLStepLoader(StepLookaheadLoader):
    """The step lookahead loader that also hands every micro-batch its step's KL rows (`step_kl_*`)."""

    def _annotate(self, batches: list[dict]) -> Iterator[dict]:
        length = max(b["kl_input_ids"].shape[1] for b in batches)
        step = {}
        for key in KL_KEYS:
            fill = IGNORE_INDEX if key == "labels" else 0
            rows = [torch.nn.functional.pad(b[f"kl_{key}"], (0, length - b[f"kl_{key}"].shape[1]), value=fill)
                    for b in batches]
            step[f"step_kl_{key}"] = torch.cat(rows)
        step["step_kl_valid"] = torch.cat([b["kl_valid"] for b in batches])
        for batch in super()._annotate(batches):
            batch.update(step)
            yield batch


class KTOData(StageData):
    """Prompt + completion -> one masked row, with its label and its mismatched KL row.

    Batches: `input_ids`, `labels`, `position_ids` (right-padded), `label` (bool `[B]`: desirable),
    `kl_input_ids`, `kl_labels`, `kl_position_ids`, `kl_valid` (bool `[B]`), `index`; training
    batches also `step_kl_*` (the step's KL rows on this rank).
    """

    step_loader = KLStepLoader  # the step's KL rows ride on every micro-batch

    def __init__(
        self,
        files: list[str] | None = None,
        template: TemplateName = "chatml",
        truncation: Truncation = "right",
        on_error: OnError = "raise",
        template_options: dict | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            files: KTO files ({prompt, completion, label} records, or preference pairs, unpaired);
                null: the embedded synthetic preference pairs, unpaired.
            template: chatml, llama3, plain, or auto/hf: the tokenizer's own Jinja chat template.
            truncation: right (cut the completion's end), left (cut the oldest prompt tokens) or drop an over-long example.
            on_error: raise (stop at the first bad record, naming file, line and field) or skip (count and go on).
            template_options: for template auto/hf (see PreferenceData).
        """
        super().__init__(**kwargs)
        self.files = [Path(f) for f in files] if files else None
        self.truncation = check_choice("truncation", truncation, choices(Truncation))
        self.on_error = check_choice("on_error", on_error, choices(OnError))
        self.template = resolve_template(template, self.tokenizer, **(template_options or {}))

    def _examples(self) -> tuple[list[KTOExample], list[LoadReport]]:
        return self.read_records(lambda file: read_kto(file, on_error=self.on_error),
                                 lambda: unpair(synthetic.preference_pairs(seed=self.seed)), "example")

    def encode(self, example: KTOExample, origin: str | None = None) -> dict | None:
        """An example -> {"prompt": ids, "completion": {input_ids, labels}, "row": fitted row, "label"}, or None (counted).
        `origin` (file and record) prefixes a template's error."""
        encoded = self.templated(origin, lambda: self.template.encode_pair(
            example["prompt"], {"completion": example["completion"]}, self.tokenizer))
        if encoded is None:
            return None
        prompt, replies = encoded
        reply = replies["completion"]
        row = self._fit(prompt, reply)
        if row is None:
            return None
        return {"prompt": prompt, "completion": reply, "row": row, "label": bool(example["label"])}

    def _fit(self, prompt: list[int], reply: dict, count: bool = True) -> dict | None:
        """prompt + reply as one row of at most `seq_len` tokens under `truncation`, or None."""
        if len(prompt) + len(reply["input_ids"]) > self.seq_len:
            if self.truncation == "drop":
                if count:
                    self.skipped["too_long_dropped"] += 1
                return None
            if self.truncation == "left":
                prompt = prompt[-max(self.seq_len - len(reply["input_ids"]), 1):]
        example = {"input_ids": prompt + reply["input_ids"], "labels": [IGNORE_INDEX] * len(prompt) + reply["labels"]}
        fitted = truncate(example, self.seq_len, "right")
        if fitted is None and count:
            self.skipped["reply_truncated_away"] += 1
        return fitted

    def _with_kl_rows(self, encoded: list[dict]) -> list[dict]:
        """Each example's row, label, and KL row: its prompt with the previous example's completion."""
        items = []
        for i, e in enumerate(encoded):
            partner = mismatched_partner(encoded, i)
            kl = None if partner is None else self._fit(e["prompt"], encoded[partner]["completion"], count=False)
            items.append({"row": e["row"], "label": e["label"], "kl": kl, "index": i})
        return items

    def _build(self) -> None:
        examples, reports = self._examples()
        encoded = [e for e in map(self.encode, examples, self._origins) if e]
        self._report("kto data", len(encoded), reports)
        train, val = self._split(encoded)
        self.train_set = ListDataset(self._with_kl_rows(train))
        self.val_set = ListDataset(self._with_kl_rows(val)) if val else None

    def class_counts(self) -> tuple[int, int]:
        """(desirable, undesirable) training examples."""
        self.setup("fit")
        desirable = sum(item["label"] for item in self.train_set)
        return desirable, len(self.train_set) - desirable

    def collate(self, items: list[dict]) -> dict:
        batch = pad_examples([item["row"] for item in items], self.tokenizer.pad_id)
        # an example without a mismatched pair gets a fully masked KL row (kl_valid False)
        empty = {"input_ids": [self.tokenizer.pad_id], "labels": [IGNORE_INDEX]}
        batch.update(pad_examples([item["kl"] or empty for item in items], self.tokenizer.pad_id, prefix="kl_"))
        batch["kl_valid"] = torch.tensor([item["kl"] is not None for item in items])
        batch["label"] = torch.tensor([item["label"] for item in items])
        batch["index"] = torch.tensor([item["index"] for item in items])
        return batch

    def _count(self, batch: dict) -> tuple[int, int]:
        return count_targets(batch["labels"]), int(batch["labels"].shape[0])
