"""Packing: examples in, rows of the batch contract out.

Design choices:
- Three layouts, named as in docs/design.md: `none` (one example per row, right
  padding to the batch's longest), `documents` (several examples per row;
  `document_ids` isolate attention, `position_ids` restart, the first token of
  every document is unlabelled so no target crosses a document boundary) and
  `concat` (pretraining only: cut a token stream into rows, attention and
  targets cross documents).
- SFT rows are filled by best-fit decreasing: every example goes to the
  fullest row it still fits in. Pretraining streams are cut in order, since a
  corpus may be larger than memory.
- Labels stay unshifted here; only `llmstages.losses` shifts.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

from llmstages.data.batch import LMBatch
from llmstages.losses import IGNORE_INDEX
from llmstages.options import Packing, Truncation, check_choice, choices

PACKING_MODES = choices(Packing)


def check_packing(packing: str, allowed: Sequence[str] = PACKING_MODES) -> str:
    return check_choice("packing", packing, allowed)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of at most `capacity` tokens (best-fit decreasing).

    Deterministic: ties are broken by index, so the same lengths give the same rows.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than the row ({capacity} tokens); truncate first")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # (remaining capacity, bin index), kept sorted so the tightest fit is a bisect away
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            remaining, b = free.pop(pos)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (remaining - n, b))
    return bins


def pack_examples(examples: Sequence[dict], indices: Sequence[int], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One packed row `[seq_len]` from the given examples, padded on the right."""
    input_ids = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    documents = np.full(seq_len, -1, dtype=np.int64)
    start = 0
    for doc, i in enumerate(indices):
        ids, lab = examples[i]["input_ids"], examples[i]["labels"]
        n = len(ids)
        input_ids[start : start + n] = ids
        labels[start : start + n] = lab
        labels[start] = IGNORE_INDEX  # nothing from the previous document predicts this token
        positions[start : start + n] = np.arange(n)
        documents[start : start + n] = doc
        start += n
    positions[start:] = np.arange(seq_len - start)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "document_ids": torch.from_numpy(documents),
    }


def pad_examples(examples: Sequence[dict], pad_id: int, length: int | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """Right-pad examples to the longest (or to `length`): `packing: none`."""
    length = length or max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.as_tensor(example["input_ids"])
        labels[row, :n] = torch.as_tensor(example["labels"])
    positions = torch.arange(length).expand(len(examples), length).clone()
    return {f"{prefix}input_ids": input_ids, f"{prefix}labels": labels, f"{prefix}position_ids": positions}


def stack_rows(rows: Sequence[dict[str, torch.Tensor]]) -> LMBatch:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def stream_row(tokens: np.ndarray, seq_len: int, eos_id: int, packing: str) -> dict[str, torch.Tensor]:
    """A pretraining row cut from a token stream in which EOS ends every document.

    `concat`: every token is a target, attention crosses documents.
    `documents`: a new document starts after each EOS; its first token is
    unlabelled and attention/positions are isolated per document.
    """
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    if len(ids) != seq_len:
        raise ValueError(f"stream row has {len(ids)} tokens, expected {seq_len}")
    labels = ids.clone()
    if packing == "concat":
        return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(seq_len)}
    starts = torch.zeros(seq_len, dtype=torch.bool)
    starts[1:] = ids[:-1] == eos_id
    labels[starts] = IGNORE_INDEX
    documents = starts.long().cumsum(0)
    index = torch.arange(seq_len)
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(0).values
    return {"input_ids": ids, "labels": labels, "position_ids": index - start_index, "document_ids": documents}


def fill_ratio(rows: Sequence[Sequence[int]], lengths: Sequence[int], seq_len: int) -> float:
    """Fraction of row positions holding real tokens."""
    return sum(lengths[i] for row in rows for i in row) / (len(rows) * seq_len) if rows else 0.0


TRUNCATION_POLICIES = choices(Truncation)


def truncate(example: dict, max_len: int, policy: str) -> dict | None:
    """Fit an encoded example into `max_len` tokens, or return None to drop it.

    `right` cuts the end (a long reply loses its tail), `left` cuts the
    beginning (the oldest context goes, the final reply stays whole), `drop`
    drops the example. An example left without target tokens is dropped:
    training on it would teach nothing and contribute a 0/0 loss.
    """
    check_choice("truncation", policy, TRUNCATION_POLICIES)
    ids, labels = example["input_ids"], example["labels"]
    if len(ids) <= max_len:
        return example
    if policy == "drop":
        return None
    keep = slice(0, max_len) if policy == "right" else slice(len(ids) - max_len, len(ids))
    labels = list(labels[keep])
    if policy == "left":
        labels[0] = IGNORE_INDEX  # its context is gone
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {**example, "input_ids": list(ids[keep]), "labels": labels}
