"""Packing, truncation and the step-lookahead loader, on hand cases and random ones.

Hand cases pin the exact tensors; hypothesis checks the invariants (capacity,
every example exactly once, labels preserved except each document's first
token) on random inputs. No tokenizer or data module is needed here.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstages.data.loader import StepLookaheadLoader
from llmstages.data.packing import (
    IGNORE_INDEX,
    best_fit_decreasing,
    check_packing,
    fill_ratio,
    pack_examples,
    pad_examples,
    stack_rows,
    stream_row,
    truncate,
)
from llmstages.losses import count_sequences, count_targets

X = IGNORE_INDEX
FAST = settings(max_examples=60, deadline=None)


def _t(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# --------------------------------------------------------------------------- best-fit decreasing


@FAST
@given(
    lengths=st.lists(st.integers(1, 40), min_size=0, max_size=60),
    extra=st.integers(0, 30),
)
def test_bfd_capacity_and_every_index_once(lengths: list[int], extra: int) -> None:
    capacity = max(lengths, default=1) + extra
    bins = best_fit_decreasing(lengths, capacity)
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert all(b for b in bins)  # no empty row
    assert Counter(i for b in bins for i in b) == Counter(range(len(lengths)))
    assert best_fit_decreasing(list(lengths), capacity) == bins  # deterministic
    # best fit never opens a row for an item that fits an open one: any two rows overflow together
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    if len(loads) >= 2:
        assert loads[0] + loads[1] > capacity


def test_bfd_hand_example_is_best_fit_not_first_fit() -> None:
    # sorted: 12 (i2) -> row 0 (8 left); 10 (i3) -> row 1 (10 left); 9 (i1) fits only row 1 (1 left);
    # 1 (i0) fits both, best fit takes row 1 (exact), first fit would take row 0
    assert best_fit_decreasing([1, 9, 12, 10], 20) == [[2], [3, 1, 0]]
    # ties broken by index
    assert best_fit_decreasing([3, 3, 3], 6) == [[0, 1], [2]]
    assert best_fit_decreasing([], 8) == []


def test_bfd_rejects_over_long_example() -> None:
    with pytest.raises(ValueError, match="1 examples are longer than the row \\(8 tokens\\)"):
        best_fit_decreasing([3, 9, 8], 8)


def test_check_packing() -> None:
    assert check_packing("documents") == "documents"
    with pytest.raises(ValueError, match="unknown packing 'concat'"):
        check_packing("concat", ("none", "documents"))


# --------------------------------------------------------------------------- document rows


def test_pack_examples_hand_case() -> None:
    examples = [
        {"input_ids": [10, 11, 12], "labels": [10, X, 12]},  # its first label must be dropped once packed
        {"input_ids": [20, 21], "labels": [X, 21]},
    ]
    row = pack_examples(examples, [1, 0], seq_len=8, pad_id=7)
    assert torch.equal(row["input_ids"], _t([20, 21, 10, 11, 12, 7, 7, 7]))
    assert torch.equal(row["labels"], _t([X, 21, X, X, 12, X, X, X]))
    assert torch.equal(row["position_ids"], _t([0, 1, 0, 1, 2, 0, 1, 2]))
    assert torch.equal(row["document_ids"], _t([0, 0, 1, 1, 1, -1, -1, -1]))
    assert all(v.dtype == torch.long for v in row.values())


def test_pack_examples_full_row_has_no_padding() -> None:
    examples = [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3, 4], "labels": [3, 4]}]
    row = pack_examples(examples, [0, 1], seq_len=4, pad_id=0)
    assert torch.equal(row["labels"], _t([X, 2, X, 4]))
    assert torch.equal(row["document_ids"], _t([0, 0, 1, 1]))


_example = st.integers(1, 12).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(2, 99), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
    )
)


@FAST
@given(raw=st.lists(_example, min_size=1, max_size=20), seq_len=st.integers(12, 30))
def test_packed_rows_keep_every_example(raw: list[tuple[list[int], list[bool]]], seq_len: int) -> None:
    pad = 1
    examples = [{"input_ids": ids, "labels": [i if keep else X for i, keep in zip(ids, mask)]} for ids, mask in raw]
    bins = best_fit_decreasing([len(e["input_ids"]) for e in examples], seq_len)
    rows = [pack_examples(examples, b, seq_len, pad) for b in bins]
    packed_targets = 0
    for b, row in zip(bins, rows):
        start = 0
        for doc, i in enumerate(b):
            ids, labels = examples[i]["input_ids"], examples[i]["labels"]
            span = slice(start, start + len(ids))
            assert row["input_ids"][span].tolist() == ids
            assert row["labels"][span].tolist() == [X] + labels[1:]
            assert row["position_ids"][span].tolist() == list(range(len(ids)))
            assert (row["document_ids"][span] == doc).all()
            start += len(ids)
        assert (row["input_ids"][start:] == pad).all()
        assert (row["labels"][start:] == X).all()
        assert (row["document_ids"][start:] == -1).all()
        packed_targets += count_targets(row["labels"][None])
    # packing loses no target: an unpacked row never scores its first token either
    assert packed_targets == sum(count_targets(_t(e["labels"])[None]) for e in examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert fill_ratio(bins, lengths, seq_len) == pytest.approx(sum(lengths) / (len(rows) * seq_len))


def test_fill_ratio_hand_case() -> None:
    assert fill_ratio([[0, 1], [2]], [3, 4, 5], 8) == pytest.approx(12 / 16)
    assert fill_ratio([], [], 8) == 0.0


def test_pad_examples_right_pads() -> None:
    examples = [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = pad_examples(examples, pad_id=1)
    assert torch.equal(batch["input_ids"], _t([[5, 6, 7], [8, 1, 1]]))
    assert torch.equal(batch["labels"], _t([[X, 6, 7], [8, X, X]]))
    assert torch.equal(batch["position_ids"], _t([[0, 1, 2], [0, 1, 2]]))
    wide = pad_examples(examples, pad_id=1, length=5, prefix="chosen_")
    assert set(wide) == {"chosen_input_ids", "chosen_labels", "chosen_position_ids"}
    assert wide["chosen_input_ids"].shape == (2, 5)
    assert torch.equal(wide["chosen_input_ids"][1], _t([8, 1, 1, 1, 1]))


def test_stack_rows() -> None:
    rows = [{"a": _t([1, 2])}, {"a": _t([3, 4])}]
    assert torch.equal(stack_rows(rows)["a"], _t([[1, 2], [3, 4]]))


# --------------------------------------------------------------------------- stream rows (pretraining)


def test_stream_row_documents_vs_concat() -> None:
    eos = 0
    tokens = np.array([5, 6, 0, 7, 8, 9, 0, 3], dtype=np.uint16)
    docs = stream_row(tokens, 8, eos, "documents")
    assert torch.equal(docs["input_ids"], _t([5, 6, 0, 7, 8, 9, 0, 3]))
    # the EOS belongs to (and is trained with) the document it ends; the next document's first token is not a target
    assert torch.equal(docs["labels"], _t([5, 6, 0, X, 8, 9, 0, X]))
    assert torch.equal(docs["position_ids"], _t([0, 1, 2, 0, 1, 2, 3, 0]))
    assert torch.equal(docs["document_ids"], _t([0, 0, 0, 1, 1, 1, 1, 2]))

    concat = stream_row(tokens, 8, eos, "concat")
    assert torch.equal(concat["labels"], concat["input_ids"])
    assert torch.equal(concat["position_ids"], torch.arange(8))
    assert "document_ids" not in concat  # attention crosses documents
    # documents mode drops exactly the targets that cross a boundary
    assert count_targets(concat["labels"][None]) - count_targets(docs["labels"][None]) == 2
    # the third document holds only its (unscored) first token, so two sequences have targets
    assert count_sequences(docs["labels"][None], docs["document_ids"][None]) == 2


def test_stream_row_wrong_length() -> None:
    with pytest.raises(ValueError, match="stream row has 3 tokens, expected 4"):
        stream_row(np.array([1, 2, 3]), 4, 0, "concat")


# --------------------------------------------------------------------------- truncation


def _example_10() -> dict:
    # 4 prompt tokens, 6 reply tokens
    ids = list(range(100, 110))
    return {"input_ids": ids, "labels": [X] * 4 + ids[4:], "extra": "kept"}


def test_truncate_fitting_example_unchanged() -> None:
    example = _example_10()
    for policy in ("right", "left", "drop"):
        assert truncate(example, 10, policy) is example


def test_truncate_right() -> None:
    out = truncate(_example_10(), 6, "right")
    assert out == {"input_ids": list(range(100, 106)), "labels": [X, X, X, X, 104, 105], "extra": "kept"}


def test_truncate_left() -> None:
    out = truncate(_example_10(), 6, "left")
    # the first kept token lost its context: unlabelled
    assert out == {"input_ids": list(range(104, 110)), "labels": [X, 105, 106, 107, 108, 109], "extra": "kept"}


def test_truncate_drop() -> None:
    assert truncate(_example_10(), 9, "drop") is None


def test_truncate_whole_reply_gone_is_dropped() -> None:
    assert truncate(_example_10(), 4, "right") is None
    # one reply token left is still a target (it is predicted from the prompt's last token)
    assert truncate(_example_10(), 5, "right")["labels"] == [X, X, X, X, 104]
    # a label on the first kept position alone is no target: a row's first token is never scored
    assert truncate({"input_ids": [1, 2, 3], "labels": [1, X, 3]}, 2, "right") is None
    # left truncation keeping only the last reply token still trains it
    assert truncate(_example_10(), 2, "left") == {"input_ids": [108, 109], "labels": [X, 109], "extra": "kept"}


def test_truncate_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown truncation 'middle'"):
        truncate(_example_10(), 20, "middle")


# --------------------------------------------------------------------------- step lookahead


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        labels = torch.randint(0, 50, (2, 9), generator=g)
        labels[torch.rand(labels.shape, generator=g) < 0.5] = X
        docs = torch.zeros(2, 9, dtype=torch.long)
        docs[:, 5:] = 1
        if k == 4:
            labels[:] = X  # a micro-batch without targets still belongs to its step
        out.append({"labels": labels, "document_ids": docs, "k": k})
    return out


def _count(batch: dict) -> tuple[int, int]:
    return count_targets(batch["labels"]), count_sequences(batch["labels"], batch["document_ids"])


def test_step_lookahead_groups_of_three_over_seven() -> None:
    batches = _batches(7)
    loader = StepLookaheadLoader(batches, accumulate=3, count=_count)
    assert len(loader) == 7
    out = list(loader)
    assert [b["k"] for b in out] == list(range(7))  # order and content untouched
    groups = [[0, 1, 2], [3, 4, 5], [6]]
    sizes = [len(g) for g in groups for _ in g]
    assert sizes == [3, 3, 3, 3, 3, 3, 1]
    for group in groups:
        tokens = sum(count_targets(batches[k]["labels"]) for k in group)
        sequences = sum(count_sequences(batches[k]["labels"], batches[k]["document_ids"]) for k in group)
        assert tokens > 0 and sequences > 0
        for k in group:
            assert out[k]["num_step_tokens"].item() == tokens
            assert out[k]["num_step_sequences"].item() == sequences
    # steps differ, so a wrong grouping could not pass by accident
    assert len({out[k]["num_step_tokens"].item() for k in (0, 3, 6)}) == 3


def test_step_lookahead_accumulate_one_and_bad_value() -> None:
    batches = _batches(2)
    for b in StepLookaheadLoader(batches, 1, _count):
        assert b["num_step_tokens"].item() == count_targets(b["labels"])
    with pytest.raises(ValueError, match="accumulate must be >= 1"):
        StepLookaheadLoader(batches, 0, _count)


def test_lookahead_counts_stop_at_the_trainers_batch_limit():
    """With limit_train_batches=5 and accumulate=4, Lightning's last step runs one micro-batch:
    its count must cover that one batch, not four (else its gradient is ~4x too small)."""
    from llmstages.data.loader import StepLookaheadLoader

    batches = [{"labels": torch.tensor([[-100, 1, 2]])} for _ in range(8)]
    loader = StepLookaheadLoader(batches, accumulate=4, count=lambda b: (2, 1), limit=5)
    seen = list(loader)
    assert len(loader) == 5 and len(seen) == 5
    assert [int(b["num_step_tokens"]) for b in seen] == [8, 8, 8, 8, 2]
