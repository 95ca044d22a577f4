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
- Clipped objective (PPO): -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A) per token.
- KL to the reference: TRL's k3 estimator exp(ref - logp) - (ref - logp) - 1 per token, added as
  `beta * kl`; with `use_bias_correction_kl` (TRL's option of that name, default False) it is
  multiplied by the unclipped, non-detached importance weight.
- Aggregation (TRL's `loss_type`), per micro-batch:
    dapo     sum / (completion tokens of the whole optimiser step, all accumulated micro-batches
             and ranks, divided by the number of ranks): TRL's `num_items_in_batch / num_processes`.
    dr_grpo  sum / (completions x max_completion_length) / accumulation steps. TRL always splits
             a generation batch into equal micro-batches, so its per-micro-batch count times the
             accumulation steps is the step's completions per rank; here the step's count is used
             directly (`num_step_completions`), which is TRL's value for equal micro-batches and a
             constant per step (so split-invariant, like dapo) for unequal ones.
    grpo     mean over each completion's tokens, mean over the micro-batch's completions,
             / accumulation steps (every token weighted by 1 / its completion's length).
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


def grpo_token_losses(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    use_bias_correction_kl: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token GRPO losses `[B, T]` (0 outside `mask`) and detached stats (kl, clip_fraction).

    `old_logps` None: on-policy, pi_old = pi detached (the ratio is exactly 1, as TRL does when
    one update follows each generation).
    """
    _check_mask("logps", logps, mask)
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logps.shape[0]}], got {tuple(advantages.shape)}")
    old = logps.detach() if old_logps is None else old_logps
    log_w = importance_log_weights(logps, old, mask, importance_sampling_level)
    policy, ratio, active = clipped_policy_loss(log_w, advantages, epsilon, epsilon_high)
    per_token = policy.expand_as(logps)
    tokens = mask.sum().clamp(min=1)
    if active.shape[1] == 1:  # sequence level: one flag per completion, averaged over completions (TRL)
        clip_fraction = active.squeeze(1).to(logps.dtype).sum() / max(len(active), 1)
    else:
        clip_fraction = (active & mask).sum() / tokens
    stats = {"clip_fraction": clip_fraction}
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
    if aggregation == "dapo":
        step_tokens = int(mask.sum()) if num_step_tokens is None else int(num_step_tokens)
        return total * num_processes / max(step_tokens, 1)
    if aggregation == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError(f"dr_grpo needs max_completion_length >= 1, got {max_completion_length}")
        completions = (
            mask.shape[0] * accumulation_steps * num_processes if num_step_completions is None else int(num_step_completions)
        )
        return total * num_processes / (max(completions, 1) * max_completion_length)
    if aggregation == "grpo":
        per_completion = masked.sum(-1) / mask.sum(-1).clamp(min=1).to(masked.dtype)
        mean = per_completion.mean() if per_completion.numel() else total * 0.0
        return mean / accumulation_steps
    return total / mask.sum().clamp(min=1).to(masked.dtype) / accumulation_steps  # bnpo
