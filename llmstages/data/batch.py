"""The batch contract: what every data module yields and every stage consumes.

Design choices:
- Batches are plain dicts of tensors (Lightning moves them to the device as
  they are); their keys and shapes are written down here once, as
  `TypedDict`s, and every collate/pack function returns one of them.
- Labels are *unshifted*: `labels[b, t] = input_ids[b, t]` where token t is
  to be predicted, else `IGNORE_INDEX` (-100). Prompt, padding and the first
  token of every packed document are -100. The one shift lives in
  `llmstages.losses`.
- `document_ids` says which document of a packed row a token belongs to,
  -1 for padding; attention never crosses documents. A batch of
  `packing: none` rows carries none: right padding needs no mask.
- Training micro-batches also carry their optimiser step's counts
  (`num_step_tokens`, `num_step_sequences`, local to this rank; the stage
  sums them over ranks), attached by `data/loader.StepLookaheadLoader`.
"""

from __future__ import annotations

from typing import TypedDict

from torch import Tensor

from llmstages.losses import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "LMBatch", "PreferenceBatch", "StepCounts", "SIDES", "sequence_prefixes"]

SIDES = ("chosen", "rejected")


class StepCounts(TypedDict, total=False):
    num_step_tokens: Tensor  # [] target tokens of this rank's micro-batches of the optimiser step
    num_step_sequences: Tensor  # [] sequences (rows, packed documents, or pairs) of the same


class LMBatch(StepCounts, total=False):
    """Pretraining and SFT rows (padded or packed)."""

    input_ids: Tensor  # [B, T] long; padding is the tokenizer's pad id
    labels: Tensor  # [B, T] long; unshifted targets, IGNORE_INDEX where nothing is predicted
    position_ids: Tensor  # [B, T] long; restart at 0 with every packed document
    document_ids: Tensor  # [B, T] long; packed rows only; -1 for padding


class PreferenceBatch(StepCounts, total=False):
    """Preference pairs: both sides right-padded to one length `T`, the prompt's tokens shared.

    `num_step_tokens` counts the chosen replies' targets (what an SFT term
    trains on); `num_step_sequences` counts pairs.
    """

    chosen_input_ids: Tensor  # [B, T]
    chosen_labels: Tensor  # [B, T]
    chosen_position_ids: Tensor  # [B, T]
    rejected_input_ids: Tensor  # [B, T]
    rejected_labels: Tensor  # [B, T]
    rejected_position_ids: Tensor  # [B, T]
    index: Tensor  # [B] the pair's position in its split (precomputed reference log-probs)


def sequence_prefixes(batch: dict) -> tuple[str, ...]:
    """The key prefixes of the token sequences in a batch: ("",) for an LMBatch, ("chosen_", "rejected_") for pairs."""
    if "input_ids" in batch:
        return ("",)
    if all(f"{side}_input_ids" in batch for side in SIDES):
        return tuple(f"{side}_" for side in SIDES)
    raise ValueError(f"not a batch of the contract (keys: {sorted(batch)}); see llmstages/data/batch.py")
