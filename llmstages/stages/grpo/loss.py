"""GRPO's loss maths: advantages, importance weights, the clipped objective, the KL, the aggregation.

Each function is the behaviour of TRL's `GRPOTrainer` (trl/trainer/grpo_trainer.py:
`_generate_and_score_completions` for advantages, `_compute_loss` for the rest), written as a
pure function of per-token log-probs `[B, T]` and a bool completion mask `[B, T]`, so the tests
can check it in float64 against formulas written out by hand.

- Advantages: the completion's reward minus its group's mean; `scale_rewards: group` divides by
  the group's unbiased std + 1e-4, `batch` by the unbiased std of every reward of the
  generation batch (all ranks) + 1e-4 (the centring stays per group), `none` does not divide
  (Dr. GRPO). A group whose rewards are all equal has std 0 and advantages exactly 0.
- Importance weights: `token`: log pi - log pi_old per token; `sequence` (GSPO): the mean of
  that log-ratio over the completion's tokens, one weight per completion, with the gradient
  flowing through every token of the mean. pi_old is detached.
- The policy term, by TRL's `loss_type` (here `loss_aggregation`; `policy_objective`):
    grpo, bnpo, dr_grpo, dapo, luspo: PPO's clipped surrogate -min(r A, clip(r, 1 - eps, 1 + eps_high) A);
             `delta` (INTELLECT-2) clamps the unclipped r from above, min(r, delta), before the min.
    cispo    -min(r, eps_high).detach() A log pi: `epsilon_high` is an absolute cap on the detached IS
             weight, not 1 + eps (TRL's default, eps_high = epsilon = 0.2, caps the weight at 0.2;
             ScaleRL recommends 5.0).
    sapo     -sigmoid(tau (r - 1)) * 4 / tau * A: a soft gate instead of the clip, tau =
             sapo_temperature_pos where A > 0, sapo_temperature_neg elsewhere.
    vespo    -phi(w) A log pi with phi(w) = e^lambda w^k e^(-lambda w) a detached Gamma-shaped weight of
             w = exp(sum of the completion's token log-ratios) (k, lambda per advantage sign).
- KL to the reference: TRL's k3 estimator exp(ref - logp) - (ref - logp) - 1 per token, added as
  `beta * kl`; with `use_bias_correction_kl` (TRL's option of that name; TRL 1.16's default is True,
  this project's False, so an existing config keeps its meaning; it matters only with beta > 0) it
  is multiplied by the unclipped, non-detached importance weight.
- Aggregation (the normaliser of TRL's `loss_type`), per micro-batch; which are split-invariant:
  dapo, cispo and vespo (one divisor for the whole step) and dr_grpo (here: see below) are; grpo,
  sapo, luspo and bnpo divide by something of the micro-batch and are not, unless the step's
  micro-batches are equal:
    dapo, cispo, vespo
             sum / (completion tokens of the whole optimiser step, all accumulated micro-batches
             and ranks, divided by the number of ranks): TRL's `num_items_in_batch / num_processes`.
    dr_grpo  sum / (completions x max_completion_length) / accumulation steps. TRL always splits
             a generation batch into equal micro-batches, so its per-micro-batch count times the
             accumulation steps is the step's completions per rank; here the step's count is used
             directly (`num_step_completions`), which is TRL's value for equal micro-batches and a
             constant per step (so split-invariant, like dapo) for unequal ones. With unequal micro-batches
             this differs from TRL, which divides by each micro-batch's own completions.
    grpo, sapo  mean over each completion's tokens, mean over the micro-batch's completions,
             / accumulation steps (every token weighted by 1 / its completion's length).
    luspo    sum over each completion's tokens (the completion's length scales it), mean over the
             micro-batch's completions, / accumulation steps (LUSPO; meant with sequence-level IS).
    bnpo     sum / the micro-batch's own completion tokens / accumulation steps.
  The result is TRL's loss value: what backward sees before DDP averages gradients over ranks.
- Every count is clamped to >= 1, so a micro-batch or step without completion tokens gives a
  zero loss in the graph (zero gradients, never NaN).

Vocabulary shared with `llmstages.losses`: `mask` is `losses.target_mask(labels)` of the
completion rows (the tokens that carry a loss), and `num_step_tokens` means what it means in
`losses.reduce_token_loss` (the step's target tokens, summed over micro-batches and ranks);
`num_step_completions` is GRPO's `num_step_sequences`. TRL's own divisors need the accumulation
steps and the number of ranks separately, where `losses` takes their product (`grad_scale`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmstages.options import ImportanceSampling, LossAggregation, ScaleRewards, check_choice, choices

__all__ = [
    "LOSS_AGGREGATIONS",
    "SCALE_REWARDS",
    "IMPORTANCE_SAMPLING_LEVELS",
    "group_advantages",
    "importance_log_weights",
    "clipped_policy_loss",
    "k3_kl",
    "aggregate_grpo_loss",
    "grpo_token_losses",
    "policy_objective",
    "vespo_weights",
    "CLIPPED",
]

LOSS_AGGREGATIONS = choices(LossAggregation)
SCALE_REWARDS = choices(ScaleRewards)
IMPORTANCE_SAMPLING_LEVELS = choices(ImportanceSampling)
ADVANTAGE_EPS = 1e-4  # TRL's constant in (r - mean) / (std + 1e-4)


def group_advantages(
    rewards: Tensor, group_size: int, scale_rewards: str = "group", batch_std: Tensor | float | None = None
) -> tuple[Tensor, Tensor]:
    """(advantages `[N]`, zero-std flag per group `[N / group_size]`) for rewards laid out group after group.

    `batch_std`: the std over the whole generation batch for `scale_rewards: batch` (under data
    parallelism: of every rank's rewards); None: the std of `rewards`.
    """
    check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    if bool(grouped.isnan().any()):
        return _nan_aware_advantages(grouped, scale_rewards, batch_std)
    mean = grouped.mean(dim=1, keepdim=True)
    # unbiased std (torch's default, as TRL); a group of one has no spread: std 0, not NaN
    group_std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    zero_std = torch.isclose(group_std.squeeze(1), torch.zeros_like(group_std.squeeze(1)))
    advantages = grouped - mean
    if scale_rewards == "group":
        advantages = advantages / (group_std + ADVANTAGE_EPS)
    elif scale_rewards == "batch":
        if batch_std is None:
            batch_std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
        advantages = advantages / (torch.as_tensor(batch_std, dtype=rewards.dtype, device=rewards.device) + ADVANTAGE_EPS)
    return advantages.reshape(-1), zero_std


def _nan_aware_advantages(grouped: Tensor, scale_rewards: str, batch_std) -> tuple[Tensor, Tensor]:
    """`group_advantages` when some rewards are NaN (unscorable): each group's mean and unbiased std over
    its scorable members only; an unscorable completion's advantage is 0 (it is not trained)."""
    scorable = ~grouped.isnan()
    count = scorable.sum(dim=1, keepdim=True)
    values = torch.where(scorable, grouped, 0.0)
    mean = values.sum(dim=1, keepdim=True) / count.clamp(min=1)
    spread = torch.where(scorable, grouped - mean, 0.0)
    group_std = (spread.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    group_std = torch.where(count > 1, group_std, torch.zeros_like(group_std))
    zero_std = torch.isclose(group_std.squeeze(1), torch.zeros_like(group_std.squeeze(1)))
    advantages = spread
    if scale_rewards == "group":
        advantages = advantages / (group_std + ADVANTAGE_EPS)
    elif scale_rewards == "batch":
        if batch_std is None:
            finite = grouped[scorable]
            batch_std = finite.std() if finite.numel() > 1 else torch.zeros((), dtype=grouped.dtype)
        advantages = advantages / (torch.as_tensor(batch_std, dtype=grouped.dtype, device=grouped.device) + ADVANTAGE_EPS)
    return torch.where(scorable, advantages, 0.0).reshape(-1), zero_std


def _check_mask(name: str, values: Tensor, mask: Tensor) -> None:
    if values.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError(f"{name} {tuple(values.shape)} must match a bool mask {tuple(mask.shape)} ({mask.dtype})")


def importance_log_weights(logps: Tensor, old_logps: Tensor, mask: Tensor, level: str = "token") -> Tensor:
    """log pi/pi_old: `[B, T]` per token, or `[B, 1]` per completion (the mean over its tokens, GSPO)."""
    check_choice("importance_sampling_level", level, IMPORTANCE_SAMPLING_LEVELS)
    _check_mask("logps", logps, mask)
    log_ratio = torch.where(mask, logps - old_logps.detach(), 0.0)
    if level == "token":
        return log_ratio
    return (log_ratio.sum(-1) / mask.sum(-1).clamp(min=1).to(logps.dtype)).unsqueeze(-1)


def clipped_policy_loss(
    log_weights: Tensor, advantages: Tensor, epsilon_low: float = 0.2, epsilon_high: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate per token, -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A).

    `log_weights` `[B, T]` or `[B, 1]` (sequence level), `advantages` `[B]`. Returns the loss
    (same shape as `log_weights`), the ratio r, and where the clip is active (TRL's clip
    fraction: r below 1 - eps_low with A < 0, or above 1 + eps_high with A > 0).
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"epsilon and epsilon_high must be >= 0, got {epsilon_low} and {epsilon_high}")
    adv = advantages.to(log_weights.dtype).unsqueeze(-1)
    ratio = torch.exp(log_weights)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    active = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    return loss, ratio, active


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 (>= 0; ref detached)."""
    delta = ref_logps.detach() - logps
    return torch.exp(delta) - delta - 1


CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL's loss types on PPO's clipped surrogate


@torch.no_grad()
def vespo_weights(
    log_ratio: Tensor, advantages: Tensor, mask: Tensor,
    k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0,
) -> Tensor:
    """VESPO's detached Gamma-shaped weight `[B, 1]`: phi(w) = e^lambda w^k e^(-lambda w), w = exp(sum of log-ratios).

    The per-token log-ratios are clamped to [-20, 20] and their completion sum to [log 1e-8, 20] (TRL's
    constants); `k`, `lambda` are the `_pos` pair for advantages >= 0, else the `_neg` pair; a
    non-finite phi is 0.
    """
    seq = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)
    adv = advantages.reshape(-1, 1)
    k = torch.where(adv >= 0, k_pos, k_neg).to(seq.dtype)
    lam = torch.where(adv >= 0, lambda_pos, lambda_neg).to(seq.dtype).clamp(min=1e-4)
    return torch.exp(lam + k * seq - lam * torch.exp(seq)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def policy_objective(
    loss_type: str, logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *,
    epsilon: float = 0.2, epsilon_high: float | None = None, importance_sampling_level: str = "token",
    delta: float | None = None, sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
    vespo: dict | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The per-token policy term of TRL's `loss_type` (before the KL and the aggregation).

    Returns the loss (`[B, T]`, or `[B, 1]` where it is one value per completion), the importance ratio
    r (the KL's bias correction multiplies by it) and detached stats. With r from
    `importance_log_weights` and A the advantage:
      clipped (grpo, bnpo, dr_grpo, dapo, luspo)  -min(r' A, clip(r, 1 - eps, 1 + eps_high) A), r' = min(r, delta)
                                                  when `delta` is set (INTELLECT-2's two-sided clip), else r
      cispo   -min(r, eps_high).detach() A log pi    (eps_high an absolute cap on the detached IS weight)
      sapo    -sigmoid(tau (r - 1)) 4 / tau A        (tau: sapo_temperature_pos where A > 0, else _neg)
      vespo   -phi(w) A log pi                       (`vespo_weights`, from the token log-ratios)
    """
    check_choice("loss_aggregation", loss_type, LOSS_AGGREGATIONS)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if epsilon < 0 or eps_high < 0:
        raise ValueError(f"epsilon and epsilon_high must be >= 0, got {epsilon} and {eps_high}")
    log_w = importance_log_weights(logps, old_logps, mask, importance_sampling_level)
    ratio = torch.exp(log_w)
    adv = advantages.to(logps.dtype).unsqueeze(-1)
    stats: dict[str, Tensor] = {}
    if loss_type in CLIPPED:
        loss, _, active = clipped_policy_loss(log_w, advantages, epsilon, epsilon_high)
        if delta is not None:
            clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
            loss = -torch.min(torch.clamp(ratio, max=delta) * adv, clipped * adv)
        stats["clip_fraction"] = _mean_over_tokens(active, mask)
    elif loss_type == "cispo":
        loss = -torch.clamp(ratio, max=eps_high).detach() * adv * logps
        stats["clip_fraction"] = _mean_over_tokens((ratio > eps_high) & (adv > 0), mask)
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg).to(logps.dtype)
        loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    else:  # vespo
        log_ratio = logps - old_logps.detach()
        phi = vespo_weights(log_ratio, advantages, mask, **(vespo or {}))
        loss = -phi * adv * logps
        stats["vespo_phi"] = phi.mean()
    return loss, ratio, {k: v.detach() for k, v in stats.items()}


def _mean_over_tokens(flags: Tensor, mask: Tensor) -> Tensor:
    """A flag's mean over completion tokens (`[B, T]`) or over completions (`[B, 1]`, sequence level: TRL)."""
    if flags.shape[1] == 1 and mask.shape[1] != 1:
        return flags.squeeze(1).double().sum() / max(len(flags), 1)
    return (flags & mask).sum() / mask.sum().clamp(min=1)


def grpo_token_losses(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    use_bias_correction_kl: bool = False,
    **objective,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token GRPO losses `[B, T]` (0 outside `mask`) and detached stats (kl, clip_fraction, vespo_phi).

    `old_logps` None: on-policy, pi_old = pi detached (the ratio is exactly 1, as TRL does when
    one update follows each generation). `loss_type` picks the policy term (`policy_objective`,
    whose further options `objective` passes on: delta, sapo_temperature_*, vespo).
    """
    _check_mask("logps", logps, mask)
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logps.shape[0]}], got {tuple(advantages.shape)}")
    old = logps.detach() if old_logps is None else old_logps
    policy, ratio, stats = policy_objective(
        loss_type, logps, old, advantages, mask, epsilon=epsilon, epsilon_high=epsilon_high,
        importance_sampling_level=importance_sampling_level, **objective,
    )
    per_token = policy.expand_as(logps)
    tokens = mask.sum().clamp(min=1)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps (the frozen reference's token log-probs)")
        kl = k3_kl(logps, ref_logps)
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
        stats["kl"] = torch.where(mask, kl, 0.0).sum().detach() / tokens
    return torch.where(mask, per_token, 0.0), {k: v.detach() for k, v in stats.items()}


def aggregate_grpo_loss(
    token_losses: Tensor,
    mask: Tensor,
    aggregation: str = "dapo",
    *,
    num_step_tokens: int | Tensor | None = None,
    num_step_completions: int | Tensor | None = None,
    max_completion_length: int | None = None,
    accumulation_steps: int = 1,
    num_processes: int = 1,
) -> Tensor:
    """One micro-batch's loss from per-token losses `[B, T]`, with TRL's meaning of `aggregation`.

    `num_step_tokens` / `num_step_completions`: completion tokens / completions of the whole
    optimiser step summed over accumulated micro-batches and ranks (None: this micro-batch is the
    step on one rank). See the section comment for each aggregation's divisor.
    """
    check_choice("loss_aggregation", aggregation, LOSS_AGGREGATIONS)
    _check_mask("token_losses", token_losses, mask)
    if accumulation_steps < 1 or num_processes < 1:
        raise ValueError(f"accumulation_steps and num_processes must be >= 1, got {accumulation_steps}, {num_processes}")
    masked = torch.where(mask, token_losses, 0.0)
    total = masked.sum()
    if aggregation in ("dapo", "cispo", "vespo"):
        step_tokens = int(mask.sum()) if num_step_tokens is None else int(num_step_tokens)
        return total * num_processes / max(step_tokens, 1)
    if aggregation == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError(f"dr_grpo needs max_completion_length >= 1, got {max_completion_length}")
        completions = (
            mask.shape[0] * accumulation_steps * num_processes if num_step_completions is None else int(num_step_completions)
        )
        return total * num_processes / (max(completions, 1) * max_completion_length)
    if aggregation in ("grpo", "sapo"):
        per_completion = masked.sum(-1) / mask.sum(-1).clamp(min=1).to(masked.dtype)
        mean = per_completion.mean() if per_completion.numel() else total * 0.0
        return mean / accumulation_steps
    if aggregation == "luspo":  # each completion's sum (its length scales it), mean over the micro-batch
        per_completion = masked.sum(-1)
        return (per_completion.mean() if per_completion.numel() else total * 0.0) / accumulation_steps
    return total / mask.sum().clamp(min=1).to(masked.dtype) / accumulation_steps  # bnpo
