"""Masking and losses: the one place where labels are shifted.

Design choices:

- Labels arrive unshifted (`labels[b, t] = input_ids[b, t]` for a target,
  else -100). `shift_labels` is the only shift in the project: the hidden
  state / logits at position t are scored against `labels[t + 1]`, so the
  first response token and the end-of-turn token are always scored.
- `token_logps` never materialises the full `[N, V]` logits. It keeps only
  target positions, applies the output layer in chunks, and recomputes each
  chunk's logits in backward (a custom autograd Function, so the weight
  gradient is accumulated in float32 and nothing of size `[N, V]` is saved).
  `recompute=False` opts into saving the `[targets, V]` softmax instead: one
  matmul less per step (~10% of a small model's step), more memory.
  The matmul runs in the inputs' (or autocast's) dtype, as an `nn.Linear`
  head would; log-softmax always runs in float32 (float64 for float64 input).
- Loss normalisation is explicit (`normalize`). The default, `token`, divides
  by the target count of the whole optimiser step (all micro-batches, all
  ranks), with `grad_scale = accumulate_grad_batches * world_size` undoing
  Lightning's and DDP's averaging: gradients then do not depend on how the
  global batch is split.
- A micro-batch or step without target tokens yields a zero that is still in
  the autograd graph (zero gradients, never NaN) and a `NoTargetTokensWarning`.
- DPO variants share one logit `z = beta * h - l` (`l` the R-DPO length
  term); IPO uses `z / beta`, so the length term enters it as `h - l / beta`.
  Reference log-probs are detached: the reference model never trains.
- ORPO's odds come from mean completion log-probs through `log1mexp`
  (log(1 - e^x) without cancellation: TRL PR #1491; the naive form is biased
  and NaN near 0, ColossalAI PR #6407).
- KTO's reference point z0 is an input of `kto_loss` (already detached and
  clamped by `kto_reference_point`): where it is averaged is the stage's
  named choice (`stages/kto.py`), not the loss's.
- Integer counts are returned as Python ints (one host sync per call): the
  callers need them for warnings, validation and all-reduce bookkeeping.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from llmstages.options import DPOLossType, LogpReduction, Normalize, check_choice, choices

__all__ = [
    "IGNORE_INDEX",
    "DEFAULT_CHUNK_SIZE",
    "NORMALIZE_MODES",
    "LOGP_REDUCTIONS",
    "DPO_LOSS_TYPES",
    "NoTargetTokensWarning",
    "shift_labels",
    "target_mask",
    "count_targets",
    "count_sequences",
    "token_logps",
    "token_logps_from_logits",
    "reduce_token_loss",
    "reduce_pair_loss",
    "sequence_logps",
    "dpo_loss",
    "reward_loss",
    "log1mexp",
    "orpo_log_odds",
    "kto_loss",
    "kto_reference_point",
    "last_target_positions",
    "all_reduce_count",
]

IGNORE_INDEX = -100
# Target positions per chunk in `token_logps` and every LMStage's `chunk_size` default. Chosen by the sweep of
# benchmarks/loss_memory.py (T 2048, vocab 32k / 128k): 256 saves the most memory (7.4x / 7.8x below full
# float32 logits; 1024 gave 3.8x / 3.95x), and no chunk size from 256 to 2048 changed the train step beyond noise.
DEFAULT_CHUNK_SIZE = 256
NORMALIZE_MODES = choices(Normalize)
LOGP_REDUCTIONS = choices(LogpReduction)
DPO_LOSS_TYPES = choices(DPOLossType)


class NoTargetTokensWarning(UserWarning):
    """A micro-batch or optimiser step had no target tokens; its loss is zero."""


def _check_2d(name: str, tensor: Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(tensor.shape)}")


# --------------------------------------------------------------------------- shift and counts


def shift_labels(labels: Tensor) -> Tensor:
    """`out[:, t] = labels[:, t + 1]`; the last position has no target."""
    _check_2d("labels", labels)
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def target_mask(labels: Tensor) -> Tensor:
    """Bool `[B, T]`: position t carries a loss (it predicts a labelled token t + 1)."""
    return shift_labels(labels) != IGNORE_INDEX


def count_targets(labels: Tensor) -> int:
    """Number of scored positions in this batch."""
    return int(target_mask(labels).sum())


def _shifted_documents(labels: Tensor, document_ids: Tensor) -> Tensor:
    """Document of each target: the document of the token being predicted (t + 1)."""
    if document_ids.shape != labels.shape:
        raise ValueError(f"document_ids {tuple(document_ids.shape)} must match labels {tuple(labels.shape)}")
    out = torch.full_like(document_ids, -1)
    out[:, :-1] = document_ids[:, 1:]
    return out


def _sequence_groups(labels: Tensor, document_ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor, int]:
    """Target positions (rows, cols), their sequence index in [0, G) and G.

    A sequence is a row, or a (row, document) pair when document ids are given.
    """
    mask = target_mask(labels)
    rows, cols = mask.nonzero(as_tuple=True)
    if document_ids is None:
        docs = torch.zeros_like(rows)
    else:
        docs = _shifted_documents(labels, document_ids)[rows, cols]
        if bool((docs < 0).any()):
            raise ValueError("a labelled token sits at a padding position (document_id -1)")
    if rows.numel() == 0:
        return rows, cols, rows, 0
    _, group = torch.unique(torch.stack([rows, docs], dim=1), dim=0, return_inverse=True)
    return rows, cols, group, int(group.max()) + 1


def count_sequences(labels: Tensor, document_ids: Tensor | None = None) -> int:
    """Sequences (rows, or row-documents) with at least one target: what `num_step_sequences` sums."""
    return _sequence_groups(labels, document_ids)[3]


def all_reduce_count(count: int, device: torch.device | str | None = None) -> int:
    """Sum an integer count over data-parallel ranks (identity without an initialised process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return int(count)
    total = torch.tensor([int(count)], dtype=torch.long, device=device)
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
    return int(total.item())


# --------------------------------------------------------------------------- token log-probs


def _logsoftmax_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(compute_dtype, torch.float32)


class _ChunkedTargetLogps(torch.autograd.Function):
    """log softmax(h @ W.T + b)[target] over selected rows, chunk by chunk.

    Saves only the inputs and the per-row log-sum-exp; backward recomputes each
    chunk's logits and applies d logp / d logits = onehot(target) - softmax.
    With `recompute=False` it saves the softmax of every chunk instead
    (`[N, V]` in the log-softmax dtype) and backward skips that matmul.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk_size: int,
        compute_dtype: torch.dtype,
        need_correct: bool,
        recompute: bool,
    ) -> tuple[Tensor, Tensor]:
        out_dtype = _logsoftmax_dtype(compute_dtype)
        n, vocab = hidden.shape[0], weight.shape[0]
        logps = torch.empty(n, dtype=out_dtype, device=hidden.device)
        lse = torch.empty(n, dtype=out_dtype, device=hidden.device)
        # the argmax is a full pass over the logits: only when asked for
        correct = torch.zeros(n if need_correct else 0, dtype=torch.bool, device=hidden.device)
        probs = None if recompute else torch.empty(n, vocab, dtype=out_dtype, device=hidden.device)
        scratch = _scratch(n, chunk_size, vocab, out_dtype, hidden.device) if recompute else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = None if bias is None else bias.to(out_dtype)
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                out = scratch[: end - start] if probs is None else probs[start:end]
                logits = _chunk_logits(hidden[start:end], w, b, compute_dtype, out_dtype, out)
                tgt = targets[start:end]
                target_logits = logits.gather(1, tgt[:, None]).squeeze(1)
                if need_correct:
                    correct[start:end] = logits.argmax(dim=-1) == tgt
                # log-sum-exp in place (no [chunk, V] temporaries); the chunk ends as exp(logits - max)
                peak = logits.amax(dim=-1)
                peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
                sums = logits.sub_(peak[:, None]).exp_().sum(dim=-1)
                lse[start:end] = peak + sums.log()
                logps[start:end] = target_logits - lse[start:end]
                if probs is not None:
                    logits.div_(sums[:, None])  # the softmax, kept for backward
        ctx.save_for_backward(hidden, weight, bias, targets, lse, probs)
        ctx.chunk_size = chunk_size
        ctx.compute_dtype = compute_dtype
        ctx.mark_non_differentiable(correct)
        return logps, correct

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps: Tensor, _grad_correct: Tensor | None):  # type: ignore[override]
        hidden, weight, bias, targets, lse, probs = ctx.saved_tensors
        compute_dtype: torch.dtype = ctx.compute_dtype
        out_dtype = _logsoftmax_dtype(compute_dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulate across chunks in (at least) float32 even for bf16 weights.
        grad_w = torch.zeros(weight.shape, dtype=out_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=out_dtype, device=weight.device) if need_b else None
        n = hidden.shape[0]
        # one reused chunk buffer: a fresh [chunk, V] allocation per chunk costs page faults on CPU
        scratch = _scratch(n, ctx.chunk_size, weight.shape[0], out_dtype, hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = None if bias is None else bias.to(out_dtype)
            for start in range(0, n, ctx.chunk_size):
                end = min(start + ctx.chunk_size, n)
                h = hidden[start:end].to(compute_dtype)
                g = grad_logps[start:end].to(out_dtype)
                # grad wrt logits = g * (onehot - softmax), built in the scratch buffer
                if probs is None:
                    grad_logits = _chunk_logits(h, w, b, compute_dtype, out_dtype, scratch[: end - start])
                    grad_logits.sub_(lse[start:end, None]).exp_().mul_(-g[:, None])
                else:  # the saved softmax stays intact: a retained graph may run backward again
                    grad_logits = torch.mul(probs[start:end], -g[:, None], out=scratch[: end - start])
                grad_logits.scatter_add_(1, targets[start:end, None], g[:, None])
                if grad_b is not None:
                    grad_b += grad_logits.sum(dim=0)
                gl = grad_logits.to(compute_dtype)
                if grad_h is not None:
                    grad_h[start:end] = (gl @ w).to(hidden.dtype)
                if grad_w is not None:
                    if gl.dtype == grad_w.dtype:
                        grad_w.addmm_(gl.t(), h)  # in place: no [V, D] temporary per chunk
                    else:
                        grad_w += (gl.t() @ h).to(out_dtype)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _scratch(n: int, chunk_size: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(min(n, chunk_size), vocab, dtype=dtype, device=device)


def _chunk_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, compute_dtype: torch.dtype, out_dtype: torch.dtype,
    out: Tensor,
) -> Tensor:
    """`hidden @ weight.T (+ bias)` in `out_dtype`, written into `out` (a contiguous `[rows, V]` buffer)."""
    if compute_dtype == out_dtype:
        torch.matmul(hidden.to(compute_dtype), weight.t(), out=out)
    else:
        out.copy_(hidden.to(compute_dtype) @ weight.t())
    if bias is not None:
        out.add_(bias)
    return out


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype an `nn.Linear` head would run its matmul in (autocast included)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def token_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    bias: Tensor | None = None,
    return_correct: bool = False,
    recompute: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-position log-probability of the next labelled token, `[B, T]`, 0 where no target.

    `hidden` `[B, T, D]`, `weight` `[V, D]` (the output layer), `labels` `[B, T]`
    unshifted. Only target positions are scored, `chunk_size` of them at a
    time; backward recomputes each chunk. With `return_correct`, also a bool
    `[B, T]`: the argmax token equals the target (False where no target).
    `recompute=False` trades memory for time: backward reuses the softmax
    saved in forward (`[targets, V]` floats, once; the plain logits path holds
    several such tensors) instead of repeating the output-layer matmul.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    batch, length, dim = hidden.shape
    if labels.shape != (batch, length):
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden's [B, T] {(batch, length)}")
    if weight.dim() != 2 or weight.shape[1] != dim:
        raise ValueError(f"weight must be [V, {dim}], got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    targets = shift_labels(labels).reshape(-1)
    index = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    selected_targets = targets.index_select(0, index)
    if selected_targets.numel() and (
        int(selected_targets.min()) < 0 or int(selected_targets.max()) >= weight.shape[0]
    ):
        raise ValueError(f"label ids must lie in [0, {weight.shape[0]}) or be {IGNORE_INDEX}")
    selected_hidden = hidden.reshape(batch * length, dim).index_select(0, index)
    compute_dtype = _compute_dtype(hidden, weight)
    selected_logps, selected_correct = _ChunkedTargetLogps.apply(
        selected_hidden, weight, bias, selected_targets, chunk_size, compute_dtype, return_correct, recompute
    )
    logps = selected_logps.new_zeros(batch * length).index_copy(0, index, selected_logps)
    logps = logps.view(batch, length)
    if not return_correct:
        return logps
    correct = torch.zeros(batch * length, dtype=torch.bool, device=hidden.device)
    correct[index] = selected_correct
    return logps, correct.view(batch, length)


def token_logps_from_logits(
    logits: Tensor, labels: Tensor, *, return_correct: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """The plain path: `log_softmax(logits)` in float32 gathered at the shifted labels, 0 where no target."""
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, T, V] with [B, T] = labels {tuple(labels.shape)}")
    targets = shift_labels(labels)
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    logp_all = F.log_softmax(logits.to(_logsoftmax_dtype(logits.dtype)), dim=-1)
    logps = torch.where(mask, logp_all.gather(-1, safe[..., None]).squeeze(-1), 0.0)
    if not return_correct:
        return logps
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == targets) & mask
    return logps, correct


# --------------------------------------------------------------------------- normalisation


def _no_targets(token_nll: Tensor, mask: Tensor, where: str) -> Tensor:
    warnings.warn(
        f"the {where} had no target tokens (all labels masked or truncated); its loss is zero",
        NoTargetTokensWarning,
        stacklevel=3,
    )
    # Still in the graph, so backward runs and yields zeros, even with inf/NaN at masked positions.
    return torch.where(mask, token_nll, 0.0).sum() * 0.0


def _step_count(value: int | Tensor, name: str, local: int) -> int:
    count = int(value)
    if count < local:
        raise ValueError(
            f"{name}={count} is smaller than this micro-batch's own count ({local}); "
            "count over every micro-batch of the optimiser step on all ranks"
        )
    return count


def reduce_token_loss(
    token_nll: Tensor,
    labels: Tensor,
    *,
    normalize: str = "token",
    num_step_tokens: int | Tensor | None = None,
    num_step_sequences: int | Tensor | None = None,
    grad_scale: float = 1.0,
    document_ids: Tensor | None = None,
) -> Tensor:
    """Scalar loss from per-position negative log-likelihoods `[B, T]` (0 at non-targets).

    `token`: sum * grad_scale / num_step_tokens (local token mean when None).
    `micro_batch`: sum / this micro-batch's targets. `sequence`: sum of
    per-sequence means * grad_scale / num_step_sequences (local mean over
    sequences when None). `sum`: sum * grad_scale. Pass `grad_scale =
    accumulate_grad_batches * world_size` with the step's global counts.
    """
    check_choice("normalize", normalize, NORMALIZE_MODES)
    if token_nll.shape != labels.shape:
        raise ValueError(f"token_nll {tuple(token_nll.shape)} must match labels {tuple(labels.shape)}")
    if grad_scale <= 0:
        raise ValueError(f"grad_scale must be > 0, got {grad_scale}")
    mask = target_mask(labels)
    local_tokens = int(mask.sum())
    if local_tokens == 0:
        return _no_targets(token_nll, mask, "micro-batch")
    total = torch.where(mask, token_nll, 0.0).sum()

    if normalize == "token":
        if num_step_tokens is None:
            return total / local_tokens
        step_tokens = _step_count(num_step_tokens, "num_step_tokens", local_tokens)
        return total * grad_scale / step_tokens
    if normalize == "micro_batch":
        return total / local_tokens
    if normalize == "sum":
        return total * grad_scale

    rows, cols, group, num_sequences = _sequence_groups(labels, document_ids)
    values = token_nll[rows, cols]
    sums = values.new_zeros(num_sequences).index_add(0, group, values)
    counts = torch.bincount(group, minlength=num_sequences).to(values.dtype)
    per_sequence = (sums / counts).sum()
    if num_step_sequences is None:
        return per_sequence / num_sequences
    step_sequences = _step_count(num_step_sequences, "num_step_sequences", num_sequences)
    return per_sequence * grad_scale / step_sequences


def reduce_pair_loss(losses: Tensor, num_step_pairs: int | Tensor | None = None, grad_scale: float = 1.0) -> Tensor:
    """Mean of per-pair (or per-example) losses over the optimiser step: sum * grad_scale / num_step_pairs.

    The pairwise twin of `normalize: token`: with the step's pair count summed
    over micro-batches and ranks, one step's gradient does not depend on how
    its pairs are split. `num_step_pairs` None: this micro-batch is the step.
    """
    if losses.dim() != 1:
        raise ValueError(f"losses must be [B], got shape {tuple(losses.shape)}")
    if num_step_pairs is None:
        return losses.mean()
    step_pairs = _step_count(num_step_pairs, "num_step_pairs", len(losses))
    return losses.sum() * grad_scale / step_pairs


def sequence_logps(token_logps: Tensor, labels: Tensor, reduction: str = "sum") -> Tensor:
    """Per-row log-probability `[B]` of the labelled tokens.

    `sum`; `mean` over the row's own targets (0 for a row without any);
    `legacy_mean_padded`: the sum divided by the padded row length T (minimind v2's bug).
    """
    check_choice("reduction", reduction, LOGP_REDUCTIONS)
    if token_logps.shape != labels.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} must match labels {tuple(labels.shape)}")
    mask = target_mask(labels)
    sums = torch.where(mask, token_logps, 0.0).sum(dim=1)
    if reduction == "sum":
        return sums
    if reduction == "mean":
        return sums / mask.sum(dim=1).clamp(min=1).to(sums.dtype)
    return sums / labels.shape[1]


# --------------------------------------------------------------------------- preference losses


def _check_dpo_options(policy_chosen: Tensor, policy_rejected: Tensor, loss_type: str, beta: float,
                       label_smoothing: float, gamma: float) -> None:
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if policy_chosen.shape != policy_rejected.shape or policy_chosen.dim() != 1:
        raise ValueError(
            f"policy_chosen {tuple(policy_chosen.shape)} and policy_rejected "
            f"{tuple(policy_rejected.shape)} must both be [B]"
        )
    eps = float(label_smoothing)
    if loss_type == "robust":
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
    elif loss_type in ("sigmoid", "simpo"):
        if not 0.0 <= eps <= 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5], got {eps}")
    elif eps != 0.0:
        raise ValueError(f"label_smoothing is not defined for loss_type {loss_type!r}; use sigmoid or robust")
    if gamma != 0.0 and loss_type != "simpo":
        raise ValueError(f"gamma is SimPO's target margin; it has no meaning for loss_type {loss_type!r}")


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    length_alpha: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses `[B]` and detached chosen/rejected rewards `[B]`.

    With `h = (pi_c - ref_c) - (pi_r - ref_r)` and `l = length_alpha * (|y_c| - |y_r|)`,
    `z = beta * h - l`: sigmoid `-(1-e) logsig(z) - e logsig(-z)`; robust
    `((1-e)(-logsig(z)) + e logsig(-z)) / (1 - 2e)`; ipo `(z / beta - 1/(2 beta))^2`;
    hinge `relu(1 - z)`; simpo (reference-free, refs ignored) uses
    `z = beta (pi_c - pi_r) - gamma - l` with the sigmoid form.
    """
    _check_dpo_options(policy_chosen, policy_rejected, loss_type, beta, label_smoothing, gamma)
    eps = float(label_smoothing)
    length_term: Tensor | float = 0.0
    if length_alpha != 0.0:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("length_alpha != 0 (R-DPO) needs chosen_lengths and rejected_lengths")
        diff = chosen_lengths.to(policy_chosen.dtype) - rejected_lengths.to(policy_chosen.dtype)
        length_term = length_alpha * diff.to(policy_chosen.device)

    if loss_type == "simpo":
        logits = beta * (policy_chosen - policy_rejected) - gamma - length_term
        losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return losses, (beta * policy_chosen).detach(), (beta * policy_rejected).detach()

    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"loss_type {loss_type!r} needs ref_chosen and ref_rejected (only simpo is reference-free)")
    if ref_chosen.shape != policy_chosen.shape or ref_rejected.shape != policy_chosen.shape:
        raise ValueError("reference log-probs must have the policy's shape [B]")
    chosen_ratio = policy_chosen - ref_chosen.detach()
    rejected_ratio = policy_rejected - ref_rejected.detach()
    logits = beta * (chosen_ratio - rejected_ratio) - length_term
    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    elif loss_type == "robust":
        losses = ((1.0 - eps) * -F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    elif loss_type == "ipo":
        losses = (logits / beta - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - logits)
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def reward_loss(
    r_chosen: Tensor,
    r_rejected: Tensor,
    *,
    margin: float | Tensor = 0.0,
    center_coef: float = 0.0,
) -> Tensor:
    """Bradley-Terry pairwise loss `[B]` with optional margin and reward-centring term."""
    if r_chosen.shape != r_rejected.shape or r_chosen.dim() != 1:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} must be [B]")
    if isinstance(margin, Tensor) and margin.dim() > 0 and margin.shape != r_chosen.shape:
        raise ValueError(f"margin must be a float or [B], got shape {tuple(margin.shape)}")
    losses = -F.logsigmoid(r_chosen - r_rejected - margin)
    if center_coef != 0.0:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    return losses


def last_target_positions(labels: Tensor, document_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the last labelled token of every row, or of every (row, document).

    Positions refer to unshifted labels (the target token itself), ordered by
    row then document start. A row or document without a labelled token is a
    ValueError: a reward head must never be read at a prompt or padding position.
    """
    _check_2d("labels", labels)
    batch, length = labels.shape
    labelled = labels != IGNORE_INDEX
    positions = torch.arange(length, device=labels.device).expand(batch, length)
    if document_ids is None:
        last = torch.where(labelled, positions, -1).amax(dim=1)
        missing = (last < 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"row {missing[0]} has no labelled token (rows without one: {missing})")
        return torch.arange(batch, device=labels.device), last

    if document_ids.shape != labels.shape:
        raise ValueError(f"document_ids {tuple(document_ids.shape)} must match labels {tuple(labels.shape)}")
    if bool((labelled & (document_ids < 0)).any()):
        raise ValueError("a labelled token sits at a padding position (document_id -1)")
    rows, cols = (document_ids >= 0).nonzero(as_tuple=True)
    present = set(rows.unique().tolist())
    empty_rows = [r for r in range(batch) if r not in present]
    if empty_rows:
        raise ValueError(f"row {empty_rows[0]} has no document and so no labelled token")
    pairs, group = torch.unique(torch.stack([rows, document_ids[rows, cols]], dim=1), dim=0, return_inverse=True)
    num = pairs.shape[0]
    starts = torch.full((num,), length, device=labels.device).scatter_reduce(0, group, cols, reduce="amin")
    marked = torch.where(labelled[rows, cols], cols, -1)
    last = torch.full((num,), -1, device=labels.device).scatter_reduce(0, group, marked, reduce="amax")
    if bool((last < 0).any()):
        bad = int((last < 0).nonzero()[0])
        raise ValueError(
            f"row {int(pairs[bad, 0])}, document {int(pairs[bad, 1])} has no labelled token"
        )
    # Order by row, then by where each document starts in the row.
    order = torch.argsort(pairs[:, 0] * (length + 1) + starts)
    return pairs[order, 0], last[order]


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, without cancellation: log(-expm1(x)) near 0, log1p(-exp(x)) below -ln 2."""
    cut = -0.6931471805599453
    return torch.where(x < cut, torch.log1p(-torch.exp(x.clamp(max=cut))), torch.log(-torch.expm1(x.clamp(min=cut))))


def orpo_log_odds(chosen_mean_logps: Tensor, rejected_mean_logps: Tensor) -> Tensor:
    """ORPO's log odds ratio `[B]`: log odds(chosen) - log odds(rejected), odds(y) = p / (1 - p) from mean log-probs.

    The loss term is `-lambda * logsigmoid(log_odds)`; a mean log-prob of exactly 0 (p = 1) has infinite odds.
    """
    if chosen_mean_logps.shape != rejected_mean_logps.shape or chosen_mean_logps.dim() != 1:
        raise ValueError(
            f"chosen {tuple(chosen_mean_logps.shape)} and rejected {tuple(rejected_mean_logps.shape)} must both be [B]"
        )
    return (chosen_mean_logps - rejected_mean_logps) - (log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps))


def kto_reference_point(kl_log_ratios: Tensor, count: int | Tensor | None = None) -> Tensor:
    """KTO's z0: the mean policy - reference log-ratio of mismatched pairs, detached, clamped at 0.

    `kl_log_ratios` `[K]` (summed completion log-probs, policy minus reference) are the pairs in scope;
    `count` their number over that scope when the sum is already all-reduced (None: `len`). No pair
    gives 0, never NaN (TRL PR #1380).
    """
    n = kl_log_ratios.numel() if count is None else int(count)
    if n == 0:
        return kl_log_ratios.new_zeros(())
    return (kl_log_ratios.detach().sum() / n).clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    z0: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-example KTO losses `[B]` (weighted) and detached rewards `beta * (logp - ref_logp)` `[B]`.

    Desirable: `w_d * (1 - sigmoid(beta * (r - z0)))`; undesirable: `w_u * (1 - sigmoid(beta * (z0 - r)))`,
    with `r = logp - ref_logp` (summed completion log-probs, reference detached) and z0 detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if policy_logps.dim() != 1 or ref_logps.shape != policy_logps.shape or desirable.shape != policy_logps.shape:
        raise ValueError(
            f"policy_logps {tuple(policy_logps.shape)}, ref_logps {tuple(ref_logps.shape)} and desirable "
            f"{tuple(desirable.shape)} must all be [B]"
        )
    ratio = policy_logps - ref_logps.detach()
    z0 = torch.as_tensor(z0, dtype=ratio.dtype, device=ratio.device).detach()
    desirable = desirable.to(torch.bool)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))),
    )
    return losses, (beta * ratio).detach()
