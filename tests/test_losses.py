"""Tests for llmstages.losses against independent references.

References are per-example Python loops over plain floats, or the papers'
formulas typed out; the tiny "language model" used for the gradient
invariance tests is an embedding, a tanh layer and an output matrix, so the
gradients of one optimiser step can be compared exactly.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from llmstages.losses import (
    DPO_LOSS_TYPES,
    IGNORE_INDEX,
    LOGP_REDUCTIONS,
    NORMALIZE_MODES,
    NoTargetTokensWarning,
    all_reduce_count,
    count_sequences,
    count_targets,
    dpo_loss,
    last_target_positions,
    reduce_token_loss,
    reward_loss,
    sequence_logps,
    shift_labels,
    target_mask,
    token_logps,
    token_logps_from_logits,
)

X = IGNORE_INDEX


# --------------------------------------------------------------------------- helpers


def _loop_shift(labels: list[list[int]]) -> list[list[int]]:
    return [[row[t + 1] if t + 1 < len(row) else X for t in range(len(row))] for row in labels]


def _loop_token_logps(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None) -> list[list[float]]:
    """log softmax(h W^T + b)[label[t+1]], computed with Python floats."""
    h, w, lab = hidden.double().tolist(), weight.double().tolist(), labels.tolist()
    b = [0.0] * len(w) if bias is None else bias.double().tolist()
    out = []
    for row_h, row_lab in zip(h, lab):
        row_out = []
        for t, vec in enumerate(row_h):
            target = row_lab[t + 1] if t + 1 < len(row_lab) else X
            if target == X:
                row_out.append(0.0)
                continue
            logits = [sum(a * c for a, c in zip(vec, wv)) + bv for wv, bv in zip(w, b)]
            top = max(logits)
            lse = top + math.log(sum(math.exp(z - top) for z in logits))
            row_out.append(logits[target] - lse)
        out.append(row_out)
    return out


def _loop_correct(hidden: Tensor, weight: Tensor, labels: Tensor) -> list[list[bool]]:
    h, w, lab = hidden.double().tolist(), weight.double().tolist(), labels.tolist()
    out = []
    for row_h, row_lab in zip(h, lab):
        row_out = []
        for t, vec in enumerate(row_h):
            target = row_lab[t + 1] if t + 1 < len(row_lab) else X
            logits = [sum(a * c for a, c in zip(vec, wv)) for wv in w]
            row_out.append(target != X and max(range(len(logits)), key=logits.__getitem__) == target)
        out.append(row_out)
    return out


def _random_labels(batch: int, length: int, vocab: int, gen: torch.Generator, p_target: float = 0.6) -> Tensor:
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    keep = torch.rand(batch, length, generator=gen) < p_target
    return torch.where(keep, ids, torch.full_like(ids, X))


def _sft_batch(n: int, length: int, vocab: int, seed: int) -> tuple[Tensor, Tensor]:
    """Right-padded prompt/response rows with varied prompt and response lengths."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (n, length), generator=gen)
    labels = torch.full((n, length), X)
    for i in range(n):
        prompt = 1 + (i * 3) % 4
        response = 1 + (i * 5) % (length - prompt)
        input_ids[i, prompt + response :] = 0  # pad id
        labels[i, prompt : prompt + response] = input_ids[i, prompt : prompt + response]
    return input_ids, labels


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 13, dim: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def nll(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        hidden = torch.tanh(self.proj(self.embed(input_ids)))
        return -token_logps(hidden, self.head.weight, labels, chunk_size=5)


def _step_grads(micro_batches: list[tuple[Tensor, Tensor]], loss_fn, seed: int = 0) -> list[Tensor]:
    """Accumulate gradients of `loss_fn(model, ids, labels)` over micro-batches (one optimiser step)."""
    model = TinyLM(seed=seed)
    for ids, labels in micro_batches:
        loss_fn(model, ids, labels).backward()
    return [p.grad.clone() for p in model.parameters()]


def _split(ids: Tensor, labels: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    return list(zip(ids.split(sizes), labels.split(sizes)))


def _grads_close(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a, b))


# --------------------------------------------------------------------------- shift


def test_first_response_token_is_scored_from_the_last_prompt_position() -> None:
    prompt_len = 3
    input_ids = torch.tensor([[11, 12, 13, 21, 22, 2, 0, 0]])
    labels = torch.tensor([[X, X, X, 21, 22, 2, X, X]])
    shifted = shift_labels(labels)
    assert shifted[0, prompt_len - 1].item() == input_ids[0, prompt_len].item() == 21
    mask = target_mask(labels)
    assert mask[0].tolist() == [False, False, True, True, True, False, False, False]
    # The EOS (2) is a target too: scored from the position before it.
    assert shifted[0, 4].item() == 2
    assert count_targets(labels) == 3


def test_shift_labels_elementwise() -> None:
    rows = [[X, 5, 6, X, 7], [1, 2, X, X, X], [X, X, X, X, 9]]
    labels = torch.tensor(rows)
    expected = _loop_shift(rows)
    out = shift_labels(labels)
    for b in range(3):
        for t in range(5):
            assert out[b, t].item() == expected[b][t]
    assert out[:, -1].eq(X).all()
    assert target_mask(labels).tolist() == [[v != X for v in row] for row in expected]
    assert count_targets(labels) == sum(v != X for row in expected for v in row) == 5
    assert labels.tolist() == rows  # input untouched


# --------------------------------------------------------------------------- token log-probs


def test_token_logps_matches_python_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 4, generator=gen)
    weight = torch.randn(9, 4, generator=gen)
    bias = torch.randn(9, generator=gen)
    labels = _random_labels(2, 6, 9, gen)
    for b in (None, bias):
        got = token_logps(hidden, weight, labels, chunk_size=3, bias=b)
        assert got.dtype == torch.float32 and got.shape == (2, 6)
        expected = torch.tensor(_loop_token_logps(hidden, weight, labels, b), dtype=torch.float32)
        assert torch.allclose(got, expected, atol=1e-5)
    assert (got[~target_mask(labels)] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_equals_full_logits_forward_and_backward(chunk_size: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    batch, length, dim, vocab = 3, 7, 5, 11
    labels = _random_labels(batch, length, vocab, gen)
    assert count_targets(labels) == 13  # chunk sizes 3, 4, 7 do not divide N; 64 exceeds it
    base_h = torch.randn(batch, length, dim, generator=gen)
    base_w = torch.randn(vocab, dim, generator=gen)
    base_b = torch.randn(vocab, generator=gen)
    upstream = torch.randn(batch, length, generator=gen)

    def run(chunked: bool) -> tuple[Tensor, list[Tensor]]:
        h = base_h.clone().requires_grad_()
        w = base_w.clone().requires_grad_()
        b = base_b.clone().requires_grad_() if with_bias else None
        if chunked:
            out = token_logps(h, w, labels, chunk_size=chunk_size, bias=b)
        else:
            logits = h @ w.T + (b if b is not None else 0.0)
            out = token_logps_from_logits(logits, labels)
        (out * upstream).sum().backward()
        return out.detach(), [t.grad for t in (h, w, b) if t is not None]

    out_c, grads_c = run(True)
    out_f, grads_f = run(False)
    assert torch.allclose(out_c, out_f, atol=1e-5)
    assert len(grads_c) == len(grads_f) == (3 if with_bias else 2)
    for gc, gf in zip(grads_c, grads_f):
        assert gc is not None and torch.allclose(gc, gf, atol=1e-5)
    # Non-target positions get no hidden gradient.
    assert (grads_c[0][~target_mask(labels)] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_saved_softmax_equals_recompute_forward_and_backward(chunk_size: int, with_bias: bool) -> None:
    """`recompute=False` keeps the softmax instead of redoing the matmul: same values, same gradients."""
    gen = torch.Generator().manual_seed(12)
    labels = _random_labels(3, 7, 11, gen)
    base = [torch.randn(3, 7, 5, generator=gen), torch.randn(11, 5, generator=gen), torch.randn(11, generator=gen)]
    upstream = torch.randn(3, 7, generator=gen)

    def run(recompute: bool) -> tuple[Tensor, list[Tensor]]:
        h, w, b = (t.clone().requires_grad_() for t in base)
        out = token_logps(h, w, labels, chunk_size=chunk_size, bias=b if with_bias else None, recompute=recompute)
        graph_loss = (out * upstream).sum()
        graph_loss.backward(retain_graph=True)
        first = [t.grad.clone() for t in (h, w, b) if t.grad is not None]
        for t in (h, w, b):
            t.grad = None
        graph_loss.backward()  # a retained graph gives the same gradients twice
        assert all(torch.equal(a, t.grad) for a, t in zip(first, (h, w, b)))
        return out.detach(), first

    out_saved, grads_saved = run(False)
    out_recomputed, grads_recomputed = run(True)
    assert torch.equal(out_saved, out_recomputed)
    assert len(grads_saved) == (3 if with_bias else 2)
    for a, b in zip(grads_saved, grads_recomputed):
        assert torch.allclose(a, b, atol=1e-6)


def test_return_correct_matches_loop_and_plain_path() -> None:
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 8, 4, generator=gen, requires_grad=True)
    weight = torch.randn(5, 4, generator=gen)
    labels = _random_labels(2, 8, 5, gen, p_target=0.8)
    logps, correct = token_logps(hidden, weight, labels, chunk_size=3, return_correct=True)
    assert correct.dtype == torch.bool and not correct.requires_grad
    assert correct.tolist() == _loop_correct(hidden.detach(), weight, labels)
    assert correct.any() and (~correct & target_mask(labels)).any()  # the example tests both outcomes
    _, plain = token_logps_from_logits(hidden @ weight.T, labels, return_correct=True)
    assert torch.equal(correct, plain)
    assert logps.requires_grad


def test_bf16_inputs_use_float32_log_softmax() -> None:
    gen = torch.Generator().manual_seed(4)
    hidden32 = torch.randn(2, 9, 16, generator=gen) * 2
    weight32 = torch.randn(40, 16, generator=gen)
    labels = _random_labels(2, 9, 40, gen)
    hidden = hidden32.bfloat16().requires_grad_()
    weight = weight32.bfloat16().requires_grad_()
    got = token_logps(hidden, weight, labels, chunk_size=4)
    assert got.dtype == torch.float32
    # Same logits as an nn.Linear head in bf16, log-softmax in float32.
    hidden_ref = hidden.detach().clone().requires_grad_()
    weight_ref = weight.detach().clone().requires_grad_()
    ref = token_logps_from_logits(hidden_ref @ weight_ref.T, labels)
    assert ref.dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-4)
    # A bf16 log-softmax would round to 8 mantissa bits; these values are not rounded.
    mask = target_mask(labels)
    assert (got[mask] != got[mask].bfloat16().float()).any()
    # And close to the float32 computation on the same (bf16-rounded) inputs.
    full32 = token_logps_from_logits(hidden.detach().float() @ weight.detach().float().T, labels)
    assert torch.allclose(got, full32, atol=0.15)
    got.sum().backward()
    ref.sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    assert torch.allclose(hidden.grad.float(), hidden_ref.grad.float(), atol=0.05, rtol=0.02)
    assert torch.allclose(weight.grad.float(), weight_ref.grad.float(), atol=0.05, rtol=0.02)


def test_autocast_follows_the_autocast_dtype() -> None:
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 6, 8, generator=gen, requires_grad=True)
    weight = torch.randn(12, 8, generator=gen, requires_grad=True)
    labels = _random_labels(2, 6, 12, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logps(hidden, weight, labels, chunk_size=5)
    assert got.dtype == torch.float32
    expected = token_logps(hidden.detach().bfloat16(), weight.detach().bfloat16(), labels, chunk_size=5)
    assert torch.allclose(got, expected, atol=1e-6)
    got.sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32  # grads in the parameters' dtype


def test_no_saved_tensor_as_large_as_the_logits() -> None:
    gen = torch.Generator().manual_seed(6)
    batch, length, dim, vocab = 2, 24, 8, 64
    labels = _random_labels(batch, length, vocab, gen, p_target=1.0)
    hidden = torch.randn(batch, length, dim, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=gen, requires_grad=True)
    full = count_targets(labels) * vocab  # logits of the scored positions only

    def largest_saved(fn) -> int:
        sizes = [0]

        def pack(t: Tensor) -> Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        out.sum().backward()
        return max(sizes)

    assert largest_saved(lambda: token_logps_from_logits(hidden @ weight.T, labels)) >= full  # the hook sees it
    assert largest_saved(lambda: token_logps(hidden, weight, labels, chunk_size=8)) < full


def test_token_logps_no_targets_gives_zero_grads() -> None:
    hidden = torch.randn(2, 4, 3, requires_grad=True)
    weight = torch.randn(5, 3, requires_grad=True)
    labels = torch.full((2, 4), X)
    out = token_logps(hidden, weight, labels)
    assert (out == 0).all()
    out.sum().backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_token_logps_rejects_bad_input() -> None:
    hidden, weight = torch.randn(1, 3, 2), torch.randn(4, 2)
    with pytest.raises(ValueError, match="label ids"):
        token_logps(hidden, weight, torch.tensor([[X, 1, 4]]))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logps(hidden, weight, torch.tensor([[X, 1, 2]]), chunk_size=0)
    with pytest.raises(ValueError, match="weight"):
        token_logps(hidden, torch.randn(4, 3), torch.tensor([[X, 1, 2]]))


# --------------------------------------------------------------------------- reduce_token_loss


def _loop_reduce(nll: Tensor, labels: Tensor, mode: str, docs: Tensor | None = None, **kw) -> float:
    values, lab = nll.tolist(), labels.tolist()
    doc = docs.tolist() if docs is not None else None
    targets = [
        (b, t)
        for b in range(len(lab))
        for t in range(len(lab[b]) - 1)
        if lab[b][t + 1] != X
    ]
    total = sum(values[b][t] for b, t in targets)
    if mode == "token":
        return total * kw["grad_scale"] / kw["num_step_tokens"] if "num_step_tokens" in kw else total / len(targets)
    if mode == "micro_batch":
        return total / len(targets)
    if mode == "sum":
        return total * kw.get("grad_scale", 1.0)
    groups: dict[tuple[int, int], list[float]] = {}
    for b, t in targets:
        key = (b, doc[b][t + 1] if doc is not None else 0)
        groups.setdefault(key, []).append(values[b][t])
    per_seq = sum(sum(v) / len(v) for v in groups.values())
    if "num_step_sequences" in kw:
        return per_seq * kw["grad_scale"] / kw["num_step_sequences"]
    return per_seq / len(groups)


def test_reduce_token_loss_modes_match_loop() -> None:
    gen = torch.Generator().manual_seed(7)
    labels = _random_labels(3, 8, 10, gen, p_target=0.5)
    labels[2] = X
    labels[2, 3] = 4  # a row with one target
    nll = torch.rand(3, 8, generator=gen) * target_mask(labels)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1, -1, -1]])
    labels[1, 7] = X  # no labelled padding
    nll = nll * target_mask(labels)
    cases = [
        ("token", {}),
        ("token", {"num_step_tokens": 40, "grad_scale": 4.0}),
        ("micro_batch", {}),
        ("sum", {"grad_scale": 3.0}),
        ("sequence", {}),
        ("sequence", {"num_step_sequences": 9, "grad_scale": 2.0}),
    ]
    for mode, kw in cases:
        got = reduce_token_loss(nll, labels, normalize=mode, **kw)
        assert got.dim() == 0
        assert math.isclose(got.item(), _loop_reduce(nll, labels, mode, **kw), rel_tol=1e-6), (mode, kw)
        got_docs = reduce_token_loss(nll, labels, normalize=mode, document_ids=docs, **kw)
        assert math.isclose(got_docs.item(), _loop_reduce(nll, labels, mode, docs, **kw), rel_tol=1e-6), (mode, kw)
    # Documents really split rows in `sequence` mode.
    assert reduce_token_loss(nll, labels, normalize="sequence").item() != pytest.approx(
        reduce_token_loss(nll, labels, normalize="sequence", document_ids=docs).item()
    )


def test_sequence_document_is_that_of_the_predicted_token() -> None:
    # concat-style packing: the first token of document 1 (position 3) is labelled and
    # predicted from position 2 (document 0); it must count towards document 1.
    labels = torch.tensor([[X, 5, 6, 7, 8]])
    docs = torch.tensor([[0, 0, 0, 1, 1]])
    nll = torch.tensor([[1.0, 2.0, 4.0, 8.0, 0.0]])
    # targets: t=0 (doc 0), t=1 (doc 0), t=2 -> token 3 (doc 1), t=3 -> token 4 (doc 1)
    got = reduce_token_loss(nll, labels, normalize="sequence", document_ids=docs)
    assert got.item() == pytest.approx(((1 + 2) / 2 + (4 + 8) / 2) / 2)
    assert count_sequences(labels, docs) == 2


def test_count_sequences_matches_loop() -> None:
    labels = torch.tensor([[X, 1, 2, X, X, 3], [X, X, X, X, X, X], [X, X, 1, X, 2, 3]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, -1, -1], [0, 0, 0, 1, 1, 1]])
    assert count_sequences(labels) == 2
    # row 0: doc 0 (tokens 1,2) and doc 1 (token 5); row 2: doc 0 (token 2) and doc 1 (tokens 4,5)
    assert count_sequences(labels, docs) == 4
    with pytest.raises(ValueError, match="padding"):
        count_sequences(labels, torch.tensor([[0, 0, 0, 1, 1, -1], [0] * 6, [0] * 6]))


def test_token_normalisation_is_invariant_to_gradient_accumulation() -> None:
    ids, labels = _sft_batch(8, 10, 13, seed=0)
    sizes = [2, 2, 2, 2]
    micro = _split(ids, labels, sizes)
    counts = [count_targets(lab) for _, lab in micro]
    assert len(set(counts)) > 1  # micro-batches really differ in target count
    total = sum(counts)
    accum = len(micro)

    whole = _step_grads([(ids, labels)], lambda m, i, lab: reduce_token_loss(m.nll(i, lab), lab))
    split = _step_grads(
        micro,
        lambda m, i, lab: reduce_token_loss(m.nll(i, lab), lab, num_step_tokens=total, grad_scale=accum) / accum,
    )
    assert _grads_close(whole, split)

    # The pre-fix behaviour (mean per micro-batch, then averaged) depends on the split.
    whole_mb = _step_grads([(ids, labels)], lambda m, i, lab: reduce_token_loss(m.nll(i, lab), lab, normalize="micro_batch"))
    split_mb = _step_grads(
        micro, lambda m, i, lab: reduce_token_loss(m.nll(i, lab), lab, normalize="micro_batch") / accum
    )
    assert torch.allclose(whole_mb[0], whole[0])  # one micro-batch: the same as `token`
    assert not _grads_close(whole_mb, split_mb)
    assert max((a - b).abs().max().item() for a, b in zip(whole_mb, split_mb)) > 1e-4


def test_sequence_and_sum_normalisation_are_invariant_to_gradient_accumulation() -> None:
    ids, labels = _sft_batch(8, 10, 13, seed=1)
    micro = _split(ids, labels, [2, 2, 2, 2])
    n_seq = sum(count_sequences(lab) for _, lab in micro)
    assert n_seq == count_sequences(labels) == 8
    whole = _step_grads([(ids, labels)], lambda m, i, lab: reduce_token_loss(m.nll(i, lab), lab, normalize="sequence"))
    split = _step_grads(
        micro,
        lambda m, i, lab: reduce_token_loss(
            m.nll(i, lab), lab, normalize="sequence", num_step_sequences=n_seq, grad_scale=4
        )
        / 4,
    )
    assert _grads_close(whole, split)
    # `sequence` is a different objective from `token` (rows weigh equally).
    token = _step_grads([(ids, labels)], lambda m, i, lab: reduce_token_loss(m.nll(i, lab), lab))
    assert not _grads_close(whole, token)
    whole_sum = _step_grads([(ids, labels)], lambda m, i, lab: reduce_token_loss(m.nll(i, lab), lab, normalize="sum"))
    split_sum = _step_grads(
        micro, lambda m, i, lab: reduce_token_loss(m.nll(i, lab), lab, normalize="sum", grad_scale=4) / 4
    )
    assert _grads_close(whole_sum, split_sum)


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=7), min_size=0, max_size=4, unique=True))
def test_token_normalisation_invariant_for_any_split(cuts: list[int]) -> None:
    ids, labels = _sft_batch(8, 9, 13, seed=2)
    bounds = [0, *sorted(cuts), 8]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    micro = _split(ids, labels, sizes)
    total = count_targets(labels)
    whole = _step_grads([(ids, labels)], lambda m, i, lab: reduce_token_loss(m.nll(i, lab), lab))
    n = len(micro)
    split = _step_grads(
        micro, lambda m, i, lab: reduce_token_loss(m.nll(i, lab), lab, num_step_tokens=total, grad_scale=n) / n
    )
    assert _grads_close(whole, split)


@pytest.mark.parametrize("mode", NORMALIZE_MODES)
def test_zero_target_micro_batch_gives_zero_loss_and_grad_with_warning(mode: str) -> None:
    model = TinyLM()
    ids = torch.randint(0, 13, (2, 5))
    labels = torch.full((2, 5), X)
    labels[1, 0] = 3  # a label at position 0 is never a target (nothing predicts it)
    with pytest.warns(NoTargetTokensWarning, match="no target tokens"):
        loss = reduce_token_loss(
            model.nll(ids, labels), labels, normalize=mode, num_step_tokens=10, num_step_sequences=3, grad_scale=2
        )
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad == 0).all()


def test_zero_targets_ignore_non_finite_values_at_masked_positions() -> None:
    nll = torch.tensor([[float("inf"), float("nan"), 1.0]], requires_grad=True)
    labels = torch.full((1, 3), X)
    with pytest.warns(NoTargetTokensWarning):
        loss = reduce_token_loss(nll, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(nll.grad, torch.zeros(1, 3))


def test_reduce_token_loss_validation() -> None:
    labels = torch.tensor([[X, 1, 2]])
    nll = torch.ones(1, 3)
    with pytest.raises(ValueError, match="token, micro_batch, sequence, sum"):
        reduce_token_loss(nll, labels, normalize="mean")
    with pytest.raises(ValueError, match="num_step_tokens"):
        reduce_token_loss(nll, labels, num_step_tokens=1)  # fewer than this micro-batch's 2 targets
    with pytest.raises(ValueError, match="grad_scale"):
        reduce_token_loss(nll, labels, num_step_tokens=4, grad_scale=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a micro-batch with targets does not warn
        assert reduce_token_loss(nll * target_mask(labels), labels, num_step_tokens=torch.tensor(4), grad_scale=2).item() == 1.0


# --------------------------------------------------------------------------- data parallel


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ids, labels = _sft_batch(8, 10, 13, seed=3)
        accum = 2
        # This rank's share of the global batch, in `accum` micro-batches of different sizes.
        share_ids, share_labels = ids[rank * 4 : (rank + 1) * 4], labels[rank * 4 : (rank + 1) * 4]
        micro = _split(share_ids, share_labels, [1, 3] if rank == 0 else [3, 1])
        local = sum(count_targets(lab) for _, lab in micro)
        step_tokens = all_reduce_count(local)
        model = TinyLM(seed=0)
        for i, lab in micro:
            loss = reduce_token_loss(model.nll(i, lab), lab, num_step_tokens=step_tokens, grad_scale=accum * world)
            (loss / accum).backward()  # Lightning's division by accumulate_grad_batches
        for p in model.parameters():  # what DDP does: all-reduce, then average over ranks
            dist.all_reduce(p.grad)
            p.grad /= world
        reference = _step_grads([(ids, labels)], lambda m, i, lab: reduce_token_loss(m.nll(i, lab), lab))
        diff = max((p.grad - r).abs().max().item() for p, r in zip(model.parameters(), reference))
        torch.save({"diff": diff, "local": local, "step": step_tokens, "scale": reference[0].abs().max().item()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_token_normalisation_is_invariant_across_ddp_ranks(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    _, labels = _sft_batch(8, 10, 13, seed=3)
    assert [r["step"] for r in results] == [count_targets(labels)] * world
    assert results[0]["local"] != results[1]["local"]  # ranks hold different token counts
    for r in results:
        assert r["scale"] > 1e-3 and r["diff"] < 1e-6


# --------------------------------------------------------------------------- sequence log-probs


def test_sequence_logps_reductions_match_loop() -> None:
    gen = torch.Generator().manual_seed(8)
    labels = _random_labels(3, 7, 10, gen, p_target=0.5)
    labels[2] = X  # a row without targets
    logps = -torch.rand(3, 7, generator=gen) * target_mask(labels)
    shifted = _loop_shift(labels.tolist())
    vals = logps.tolist()
    for reduction in LOGP_REDUCTIONS:
        got = sequence_logps(logps, labels, reduction)
        assert got.shape == (3,) and torch.isfinite(got).all()
        for b in range(3):
            picked = [vals[b][t] for t in range(7) if shifted[b][t] != X]
            expected = {
                "sum": sum(picked),
                "mean": sum(picked) / len(picked) if picked else 0.0,
                "legacy_mean_padded": sum(picked) / 7,
            }[reduction]
            assert got[b].item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="sum, mean, legacy_mean_padded"):
        sequence_logps(logps, labels, "avg")


def test_legacy_mean_padded_depends_on_padding_only_it() -> None:
    labels = torch.tensor([[X, X, 4, 5, 6]])
    logps = torch.tensor([[-0.5, -1.0, -2.0, -3.0, 0.0]]) * target_mask(labels)
    padded_labels = torch.cat([labels, torch.full((1, 4), X)], dim=1)
    padded_logps = torch.cat([logps, torch.zeros(1, 4)], dim=1)
    for reduction in ("sum", "mean"):
        assert sequence_logps(logps, labels, reduction).item() == pytest.approx(
            sequence_logps(padded_logps, padded_labels, reduction).item()
        )
    short = sequence_logps(logps, labels, "legacy_mean_padded").item()
    long = sequence_logps(padded_logps, padded_labels, "legacy_mean_padded").item()
    assert short == pytest.approx(-6.0 / 5) and long == pytest.approx(-6.0 / 9)
    assert sequence_logps(logps, labels, "mean").item() == pytest.approx(-6.0 / 3)


# --------------------------------------------------------------------------- DPO


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


PC, PR, RC, RR = -1.0, -2.0, -1.5, -1.7  # h = 0.5 - (-0.3) = 0.8


def _pairs(*values: float) -> list[Tensor]:
    return [torch.tensor([v]) for v in values]


def test_dpo_loss_types_match_their_formulas() -> None:
    beta, h = 0.5, 0.8
    pc, pr, rc, rr = _pairs(PC, PR, RC, RR)
    z = beta * h
    expected = {
        "sigmoid": -_logsig(z),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": max(0.0, 1 - z),
        "robust": -_logsig(z),  # eps = 0
    }
    for loss_type, value in expected.items():
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, beta=beta)
        assert losses.item() == pytest.approx(value, rel=1e-6), loss_type
        assert cr.item() == pytest.approx(beta * (PC - RC)) and rj.item() == pytest.approx(beta * (PR - RR))
    eps = 0.2
    robust = dpo_loss(pc, pr, rc, rr, loss_type="robust", beta=beta, label_smoothing=eps)[0].item()
    assert robust == pytest.approx(((1 - eps) * -_logsig(z) + eps * _logsig(-z)) / (1 - 2 * eps))
    cdpo = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)[0].item()
    assert cdpo == pytest.approx(-(1 - eps) * _logsig(z) - eps * _logsig(-z))
    hinge_low = dpo_loss(pc, pr, rc, rr, loss_type="hinge", beta=5.0)[0].item()
    assert hinge_low == 0.0  # beta * h = 4 > 1: the margin is met


def test_simpo_is_reference_free() -> None:
    beta, gamma = 2.0, 0.3
    pc, pr, rc, rr = _pairs(PC, PR, RC, RR)
    losses, cr, rj = dpo_loss(pc, pr, loss_type="simpo", beta=beta, gamma=gamma)
    assert losses.item() == pytest.approx(-_logsig(beta * (PC - PR) - gamma))
    assert cr.item() == pytest.approx(beta * PC) and rj.item() == pytest.approx(beta * PR)
    with_refs = dpo_loss(pc, pr, rc, rr, loss_type="simpo", beta=beta, gamma=gamma)[0]
    assert with_refs.item() == pytest.approx(losses.item())
    length = dpo_loss(
        pc, pr, loss_type="simpo", beta=beta, gamma=gamma, length_alpha=0.1,
        chosen_lengths=torch.tensor([5]), rejected_lengths=torch.tensor([2]),
    )[0]
    assert length.item() == pytest.approx(-_logsig(beta * (PC - PR) - gamma - 0.3))


def test_dpo_at_reference_is_log2_with_zero_rewards() -> None:
    policy_c = torch.tensor([-3.0, -7.5, -0.2], requires_grad=True)
    policy_r = torch.tensor([-4.0, -1.0, -9.0], requires_grad=True)
    losses, cr, rj = dpo_loss(policy_c, policy_r, policy_c.detach().clone(), policy_r.detach().clone(), beta=0.3)
    assert torch.allclose(losses, torch.full((3,), math.log(2.0)))
    assert (cr == 0).all() and (rj == 0).all() and not cr.requires_grad and not rj.requires_grad
    losses.sum().backward()
    # d/dpi_c of -logsig(beta h) at h=0 is -beta/2.
    assert torch.allclose(policy_c.grad, torch.full((3,), -0.15))
    assert torch.allclose(policy_r.grad, torch.full((3,), 0.15))


def test_dpo_reference_is_not_trained() -> None:
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    rc, rr = torch.tensor([-1.5], requires_grad=True), torch.tensor([-1.7], requires_grad=True)
    dpo_loss(pc, pr, rc, rr)[0].sum().backward()
    assert pc.grad is not None and rc.grad is None and rr.grad is None


def test_length_term_penalises_longer_chosen() -> None:
    beta, alpha, h = 0.5, 0.05, 0.8
    pc, pr, rc, rr = _pairs(PC, PR, RC, RR)
    lengths = {"chosen_lengths": torch.tensor([10]), "rejected_lengths": torch.tensor([4])}
    plain = dpo_loss(pc, pr, rc, rr, beta=beta)[0].item()
    longer = dpo_loss(pc, pr, rc, rr, beta=beta, length_alpha=alpha, **lengths)[0].item()
    assert longer == pytest.approx(-_logsig(beta * h - alpha * 6))
    assert longer > plain
    swapped = dpo_loss(
        pc, pr, rc, rr, beta=beta, length_alpha=alpha,
        chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([10]),
    )[0].item()
    assert swapped < plain
    hinge = dpo_loss(pc, pr, rc, rr, loss_type="hinge", beta=beta, length_alpha=alpha, **lengths)[0].item()
    assert hinge == pytest.approx(1 - (beta * h - alpha * 6))
    # IPO: the length term enters as h - l / beta.
    ipo = dpo_loss(pc, pr, rc, rr, loss_type="ipo", beta=beta, length_alpha=alpha, **lengths)[0].item()
    assert ipo == pytest.approx((h - alpha * 6 / beta - 1 / (2 * beta)) ** 2)


def test_label_smoothing_zero_and_robust_zero_equal_plain_dpo() -> None:
    gen = torch.Generator().manual_seed(9)
    pc, pr, rc, rr = (-torch.rand(5, generator=gen) * 10 for _ in range(4))
    plain = dpo_loss(pc, pr, rc, rr, beta=0.2)[0]
    manual = -torch.nn.functional.logsigmoid(0.2 * ((pc - rc) - (pr - rr)))
    assert torch.allclose(plain, manual)
    assert torch.equal(dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.0)[0], plain)
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, loss_type="robust", beta=0.2, label_smoothing=0.0)[0], plain)


def test_dpo_loss_validation() -> None:
    pc, pr, rc, rr = _pairs(PC, PR, RC, RR)
    with pytest.raises(ValueError, match=", ".join(DPO_LOSS_TYPES)):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")
    for loss_type in ("sigmoid", "ipo", "hinge", "robust"):
        with pytest.raises(ValueError, match="ref_chosen"):
            dpo_loss(pc, pr, loss_type=loss_type)
    with pytest.raises(ValueError, match="0.5"):
        dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(pc, pr, rc, rr, length_alpha=0.1)
    with pytest.raises(ValueError, match="gamma"):
        dpo_loss(pc, pr, rc, rr, gamma=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


# --------------------------------------------------------------------------- reward model


def test_reward_loss_matches_formula() -> None:
    rc = torch.tensor([1.0, -0.5, 2.0])
    rr = torch.tensor([0.2, 0.5, 2.5])
    margin = torch.tensor([0.0, 1.0, 0.3])
    got = reward_loss(rc, rr, margin=margin, center_coef=0.01)
    for i in range(3):
        a, b, m = rc[i].item(), rr[i].item(), margin[i].item()
        assert got[i].item() == pytest.approx(-_logsig(a - b - m) + 0.01 * (a + b) ** 2, rel=1e-6)
    plain = reward_loss(rc, rr, margin=0.25)
    assert torch.allclose(plain, torch.tensor([-_logsig(a - b - 0.25) for a, b in zip(rc.tolist(), rr.tolist())]))


def test_last_target_positions_right_padded() -> None:
    labels = torch.tensor([[X, X, 5, 6, X, X], [X, 7, 8, 9, 2, X], [X, X, X, X, X, 4]])
    rows, cols = last_target_positions(labels)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [3, 4, 5]
    assert rows.dtype == cols.dtype == torch.long
    assert (labels[rows, cols] != X).all()


def test_last_target_positions_packed_orders_by_document_start() -> None:
    # Document ids are not in start order (5 starts before 2): order follows the row layout.
    labels = torch.tensor([[X, 3, 4, X, 6, X, X], [X, 1, X, X, 2, 3, X]])
    docs = torch.tensor([[5, 5, 5, 2, 2, -1, -1], [0, 0, 0, 1, 1, 1, -1]])
    rows, cols = last_target_positions(labels, docs)
    assert rows.tolist() == [0, 0, 1, 1]
    assert cols.tolist() == [2, 4, 1, 5]
    assert (docs[rows, cols] >= 0).all()


def test_last_target_positions_errors_name_the_row() -> None:
    labels = torch.tensor([[X, 3, 4], [X, X, X]])
    with pytest.raises(ValueError, match="row 1"):
        last_target_positions(labels)
    packed = torch.tensor([[X, 3, X, X], [X, 1, X, 2]])
    docs = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    with pytest.raises(ValueError, match="row 0, document 1"):
        last_target_positions(packed, docs)
    with pytest.raises(ValueError, match="row 1"):
        last_target_positions(torch.tensor([[X, 3], [X, X]]), torch.tensor([[0, 0], [-1, -1]]))
