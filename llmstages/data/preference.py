"""PreferenceData: prompt + chosen/rejected replies -> two masked sequences sharing the prompt's tokens.

Design choices:
- Both sides share the prompt's tokens exactly; truncation treats the pair as
  one (`left` cuts the same prompt tokens from both sides), so a preference
  loss always compares replies to the same context.
- Both sides are right-padded to one length so a stage can run them in one
  forward pass; `index` identifies the pair for precomputed reference log-probs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.progress import track

from llmstages.data import synthetic
from llmstages.data.batch import SIDES, PreferenceBatch
from llmstages.data.base import ListDataset, StageData
from llmstages.data.formats import LoadReport, read_preference
from llmstages.data.packing import pad_examples, truncate
from llmstages.data.chat import resolve_template
from llmstages.losses import IGNORE_INDEX, count_targets
from llmstages.options import OnError, TemplateName, Truncation, check_choice, choices


class PreferenceData(StageData):
    """Prompt + chosen/rejected replies -> two masked sequences sharing the prompt's tokens.

    Batches: `chosen_{input_ids,labels,position_ids}`, `rejected_{...}` (both
    right-padded to one length so a stage can run them in one forward pass)
    and `index` (the pair's position in its split, for precomputed reference
    log-probabilities).
    """

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
            files: preference files (sharegpt conversations + chosen + rejected, or prompt/chosen/rejected; JSON,
                JSONL, Parquet or a datasets.save_to_disk folder); null: the embedded synthetic pairs.
            template: chatml, llama3, plain, or auto/hf: the tokenizer's own Jinja chat template (a model folder's);
                the chat template that renders prompt and replies into tokens.
            truncation: right (cut the replies' ends), left (cut the oldest prompt tokens) or drop an over-long pair.
            on_error: raise (stop at the first bad record, naming file, line and field) or skip (count and go on).
            template_options: for template auto/hf: date_string (pins Llama-3.1's date), dropped_system
                (error or warn when the template drops a system message), template_kwargs (e.g. enable_thinking).
        """
        super().__init__(**kwargs)
        self.files = [Path(f) for f in files] if files else None
        self.truncation = check_choice("truncation", truncation, choices(Truncation))
        self.on_error = check_choice("on_error", on_error, choices(OnError))
        self.template = resolve_template(template, self.tokenizer, **(template_options or {}))

    def _pairs(self) -> tuple[list[dict], list[LoadReport]]:
        return self.read_records(lambda file: read_preference(file, on_error=self.on_error),
                                 lambda: synthetic.preference_pairs(seed=self.seed), "pair")

    def encode(self, pair: dict, origin: str | None = None) -> dict | None:
        """A pair -> {"chosen": example, "rejected": example} sharing one prompt, or None (counted).

        Truncation treats the pair as one: `left` cuts the same oldest prompt
        tokens from both sides, so DPO always compares replies to the same context. `origin` (file and
        record) prefixes a template's error.
        """
        encoded = self.templated(origin, lambda: self.template.encode_pair(
            pair["prompt"], {side: pair[side] for side in SIDES}, self.tokenizer
        ))
        if encoded is None:
            return None
        prompt, replies = encoded
        longest = max(len(r["input_ids"]) for r in replies.values())
        over = len(prompt) + longest > self.seq_len
        if over:
            if self.truncation == "drop":
                self.skipped["too_long_dropped"] += 1
                return None
            if self.truncation == "left":
                keep = self.seq_len - longest
                if keep < 1:
                    self.skipped["reply_truncated_away"] += 1
                    return None
                prompt = prompt[-keep:]
        sides = {}
        for side, reply in replies.items():
            example = {"input_ids": prompt + reply["input_ids"], "labels": [IGNORE_INDEX] * len(prompt) + reply["labels"]}
            fitted = truncate(example, self.seq_len, "right")
            if fitted is None:
                self.skipped["reply_truncated_away"] += 1
                return None
            sides[side] = fitted
        if over:
            self.truncated += 1  # kept, but cut (prompt from the left or replies from the right)
        return sides

    def _build(self) -> None:
        pairs, reports = self._pairs()
        self.truncated = 0
        encoded = [e for e in (self.encode(p, self._origins[k])
                               for k, p in enumerate(track(pairs, description="encoding", disable=len(pairs) < 5000))) if e]
        self._report("preference data", len(encoded), reports)
        train, val = self._split(encoded)
        self.train_set = ListDataset([{**e, "index": i} for i, e in enumerate(train)])
        self.val_set = ListDataset([{**e, "index": i} for i, e in enumerate(val)]) if val else None

    def collate(self, items: list) -> PreferenceBatch:
        length = max(len(item[side]["input_ids"]) for item in items for side in ("chosen", "rejected"))
        batch = {"index": torch.tensor([item["index"] for item in items])}
        for side in ("chosen", "rejected"):
            batch.update(pad_examples([item[side] for item in items], self.tokenizer.pad_id, length, prefix=f"{side}_"))
        return batch

    # which chosen tokens an SFT term trains and the step counts: the reply, or prompt and reply (ORPO's
    # `nll_scope`, set by the stage on its data module as GRPO sets `num_iterations`)
    sft_scope: str = "completion"

    def _count(self, batch: dict) -> tuple[int, int]:
        # tokens of the chosen replies (what an SFT term trains on); sequences = pairs
        labels = batch["chosen_labels"]
        if self.sft_scope == "prompt_and_completion":
            labels = with_prompt_labels(batch["chosen_input_ids"], labels)
        return count_targets(labels), int(labels.shape[0])


def with_prompt_labels(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Labels covering each row's prompt and reply: every token up to the row's last labelled one (padding stays -100)."""
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    last = torch.where(labels != IGNORE_INDEX, positions, -1).amax(dim=1, keepdim=True)
    return torch.where(positions <= last, input_ids, torch.full_like(labels, IGNORE_INDEX))
