"""GRPO's pure loss functions against formulas written out here, in float64, gradients included.

Gradients are taken with respect to the per-token log-probs (leaf tensors), so every test states
exactly how much each token of each completion pulls, for completions as short as 3 tokens and as
long as 64, with one group whose rewards are all equal (advantage 0).

Splitting a step is simulated the way training runs it: each micro-batch's loss is backpropagated
on its own and the gradients add up; under data parallelism each rank's gradient is then averaged
over ranks (DDP), i.e. a rank's rows get 1 / world_size of their local gradient.
"""

import math
import statistics

import pytest
import torch

from llmstages.stages.grpo.loss import (
    aggregate_grpo_loss,
    clipped_policy_loss,
    group_advantages,
    grpo_token_losses,
    importance_log_weights,
    k3_kl,
)

LENGTHS = [3, 64, 5, 17, 3, 64, 9, 30]  # two groups of four completions
REWARDS = [1.0, 0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]  # the second group: all equal -> advantage 0
GROUP = 4
MAX_LEN = 64


def completion_mask(lengths=LENGTHS, width=MAX_LEN) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def leaf_logps(seed: int = 0, rows: int = len(LENGTHS), width: int = MAX_LEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (-torch.rand(rows, width, generator=g, dtype=torch.float64) * 3).requires_grad_(True)


def hand_advantages(rewards, group, scale):
    out = []
    everything = statistics.stdev(rewards)
    for start in range(0, len(rewards), group):
        block = rewards[start : start + group]
        mean, std = statistics.fmean(block), statistics.stdev(block)
        divisor = {"group": std + 1e-4, "batch": everything + 1e-4, "none": 1.0}[scale]
        out += [(r - mean) / divisor for r in block]
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_the_formula(scale):
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    advantages, zero_std = group_advantages(rewards, GROUP, scale)
    torch.testing.assert_close(advantages, hand_advantages(REWARDS, GROUP, scale), rtol=1e-12, atol=1e-12)
    assert zero_std.tolist() == [False, True]
    assert (advantages[4:] == 0).all()  # the all-equal group: exactly zero, not 0/1e-4 noise


def test_batch_scale_uses_the_given_global_std():
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    advantages, _ = group_advantages(rewards, GROUP, "batch", batch_std=2.0)
    centred = hand_advantages(REWARDS, GROUP, "none")
    torch.testing.assert_close(advantages, centred / (2.0 + 1e-4))


def test_group_advantages_reject_a_ragged_layout():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(8), 4, "groups")


# --------------------------------------------------------------------------- KL


@pytest.mark.parametrize("bias_correction", [False, True])
def test_k3_kl_value_and_gradient(bias_correction):
    mask = completion_mask()
    logps, ref = leaf_logps(0), leaf_logps(1).detach()
    old = (logps.detach() + 0.1 * torch.randn(logps.shape, dtype=torch.float64)).detach()
    zeros = torch.zeros(len(LENGTHS), dtype=torch.float64)
    beta = 0.3
    losses, stats = grpo_token_losses(
        logps, old, zeros, mask, beta=beta, ref_logps=ref, use_bias_correction_kl=bias_correction
    )
    losses.sum().backward()

    kl = torch.exp(ref - logps.detach()) - (ref - logps.detach()) - 1
    dkl = 1 - torch.exp(ref - logps.detach())  # d kl / d logp
    if bias_correction:
        r = torch.exp(logps.detach() - old)  # d r / d logp = r
        value, grad = r * kl, r * kl + r * dkl
    else:
        value, grad = kl, dkl
    assert (kl[mask] >= 0).all()
    torch.testing.assert_close(k3_kl(logps, ref).detach(), kl)
    torch.testing.assert_close(losses.detach(), torch.where(mask, beta * value, 0.0))
    torch.testing.assert_close(logps.grad, torch.where(mask, beta * grad, 0.0))
    torch.testing.assert_close(stats["kl"], value[mask].mean())


# --------------------------------------------------------------------------- clipped objective


def test_token_level_clipped_objective_and_gradient():
    mask = completion_mask()
    logps = leaf_logps(2)
    # ratios from 0.5 to 1.5: some inside, some outside the (asymmetric) clip range
    log_ratio = torch.linspace(math.log(0.5), math.log(1.5), MAX_LEN, dtype=torch.float64).expand(len(LENGTHS), -1)
    old = logps.detach() - log_ratio
    advantages = torch.tensor([1.0, -1.0, 0.5, -2.0, 1.0, -1.0, 0.0, 3.0], dtype=torch.float64)
    eps_low, eps_high = 0.2, 0.28
    losses, stats = grpo_token_losses(logps, old, advantages, mask, epsilon=eps_low, epsilon_high=eps_high)
    losses.sum().backward()

    r = torch.exp(log_ratio)
    a = advantages[:, None]
    expected = -torch.minimum(r * a, r.clamp(1 - eps_low, 1 + eps_high) * a)
    active = ((r < 1 - eps_low) & (a < 0)) | ((r > 1 + eps_high) & (a > 0))
    grad = torch.where(active, 0.0, -a * r)  # a clipped token does not pull at all
    torch.testing.assert_close(losses.detach(), torch.where(mask, expected, 0.0))
    torch.testing.assert_close(logps.grad, torch.where(mask, grad, 0.0))
    torch.testing.assert_close(stats["clip_fraction"], (active & mask).sum() / mask.sum())
    assert 0 < float(stats["clip_fraction"]) < 1


def test_sequence_level_weight_is_the_mean_log_ratio_and_its_gradient():
    mask = completion_mask()
    logps = leaf_logps(3)
    old = (logps.detach() + 0.05 * torch.randn(logps.shape, dtype=torch.float64)).detach()
    advantages = torch.tensor([1.0, -1.0, 0.5, -2.0, 1.0, -1.0, 0.0, 3.0], dtype=torch.float64)
    eps = 0.02  # small, so some completions are clipped
    log_w = importance_log_weights(logps, old, mask, "sequence")
    lengths = torch.tensor(LENGTHS, dtype=torch.float64)
    mean_log_ratio = torch.where(mask, logps.detach() - old, 0.0).sum(1) / lengths
    torch.testing.assert_close(log_w.detach().squeeze(1), mean_log_ratio)

    losses, _ = grpo_token_losses(logps, old, advantages, mask, epsilon=eps, importance_sampling_level="sequence")
    losses.sum().backward()
    s = torch.exp(mean_log_ratio)
    expected = -torch.minimum(s * advantages, s.clamp(1 - eps, 1 + eps) * advantages)
    active = ((s < 1 - eps) & (advantages < 0)) | ((s > 1 + eps) & (advantages > 0))
    # every token of completion i carries the same loss; the sum over its |o_i| tokens differentiates
    # to |o_i| * (-A s / |o_i|) = -A s at each token (0 when clipped)
    grad = torch.where(active, 0.0, -advantages * s)[:, None].expand_as(mask)
    torch.testing.assert_close(losses.detach(), torch.where(mask, expected[:, None], 0.0))
    torch.testing.assert_close(logps.grad, torch.where(mask, grad, 0.0))
    assert active.any() and not active.all()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_clipped_gradient_is_the_plain_policy_gradient(level):
    """Ratio 1 (pi_old = pi): the clip is inactive, and the gradient is -A grad log pi (token level) or
    -A grad mean_t log pi (sequence level), aggregated the same way."""
    mask = completion_mask()
    advantages, _ = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), GROUP)
    for aggregation in ("dapo", "dr_grpo", "grpo", "bnpo"):
        logps = leaf_logps(4)
        losses, stats = grpo_token_losses(logps, None, advantages, mask, importance_sampling_level=level)
        aggregate_grpo_loss(losses, mask, aggregation, max_completion_length=MAX_LEN).backward()
        assert float(stats["clip_fraction"]) == 0.0

        plain = leaf_logps(4)
        if level == "token":
            pg = -advantages[:, None] * plain
        else:
            mean_logp = torch.where(mask, plain, 0.0).sum(1) / mask.sum(1)
            pg = (-advantages * mean_logp)[:, None].expand_as(mask)
        aggregate_grpo_loss(torch.where(mask, pg, 0.0), mask, aggregation, max_completion_length=MAX_LEN).backward()
        torch.testing.assert_close(logps.grad, plain.grad, msg=aggregation)


# --------------------------------------------------------------------------- aggregations: formulas


def on_policy_grad(aggregation: str, splits: list[list[int]], world_size: int = 1, beta: float = 0.0):
    """d(step loss)/d logps for completions split into micro-batches; `splits[k]` = rows of micro-batch k.

    With world_size > 1, `splits` lists every rank's micro-batches, rank after rank, each rank holding
    len(splits) / world_size of them; DDP's mean gives each rank's rows 1 / world_size of their gradient.
    """
    mask = completion_mask()
    advantages, _ = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), GROUP)
    logps = leaf_logps(5)
    ref = leaf_logps(6).detach()
    step_tokens = int(mask.sum())
    per_rank = len(splits) // world_size
    for rows in splits:
        rows = torch.tensor(rows)
        losses, _ = grpo_token_losses(logps[rows], None, advantages[rows], mask[rows], beta=beta, ref_logps=ref[rows])
        loss = aggregate_grpo_loss(
            losses, mask[rows], aggregation, num_step_tokens=step_tokens, num_step_completions=len(LENGTHS),
            max_completion_length=MAX_LEN, accumulation_steps=per_rank, num_processes=world_size,
        )
        (loss / world_size).backward()  # DDP averages the ranks' gradients
    return logps.grad


def test_each_aggregation_matches_its_formula_for_one_micro_batch_and_for_two():
    mask = completion_mask()
    a = hand_advantages(REWARDS, GROUP, "group")[:, None]
    lengths = torch.tensor(LENGTHS, dtype=torch.float64)[:, None]
    n, tokens = len(LENGTHS), float(sum(LENGTHS))
    halves = [[0, 1, 2, 3], [4, 5, 6, 7]]
    half_tokens = torch.tensor([sum(LENGTHS[:4])] * 4 + [sum(LENGTHS[4:])] * 4, dtype=torch.float64)[:, None]
    expected = {
        "dapo": (-a / tokens, -a / tokens),
        "dr_grpo": (-a / (n * MAX_LEN), -a / (n * MAX_LEN)),
        "grpo": (-a / (lengths * n), -a / (lengths * 4 * 2)),
        "bnpo": (-a / tokens, -a / (half_tokens * 2)),
    }
    for aggregation, (whole, split) in expected.items():
        torch.testing.assert_close(on_policy_grad(aggregation, [list(range(8))]), torch.where(mask, whole, 0.0))
        torch.testing.assert_close(on_policy_grad(aggregation, halves), torch.where(mask, split, 0.0))


def test_aggregated_value_for_one_micro_batch():
    mask = completion_mask()
    logps = leaf_logps(7)
    a = hand_advantages(REWARDS, GROUP, "group")
    losses, _ = grpo_token_losses(logps, None, a, mask)  # on-policy: each token's loss is -A
    lengths = torch.tensor(LENGTHS, dtype=torch.float64)
    values = {
        "dapo": float((-a * lengths).sum() / lengths.sum()),
        "dr_grpo": float((-a * lengths).sum() / (len(LENGTHS) * MAX_LEN)),
        "grpo": float((-a).mean()),
        "bnpo": float((-a * lengths).sum() / lengths.sum()),
    }
    for aggregation, value in values.items():
        got = aggregate_grpo_loss(losses, mask, aggregation, max_completion_length=MAX_LEN)
        assert float(got.detach()) == pytest.approx(value, rel=1e-12, abs=1e-15), aggregation


# --------------------------------------------------------------------------- aggregations: invariance

ONE = [list(range(8))]
FOUR_BY_TWO = [[0, 1], [2, 3], [4, 5], [6, 7]]
THREE_FIVE = [[0, 1, 2], [3, 4, 5, 6, 7]]
TWO_RANKS = [[0, 1], [2, 3], [4, 5], [6, 7]]  # rank 0: [0,1] then [2,3]; rank 1: [4,5] then [6,7]


@pytest.mark.parametrize("aggregation", ["dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_dapo_and_dr_grpo_do_not_depend_on_the_split(aggregation, beta):
    whole = on_policy_grad(aggregation, ONE, beta=beta)
    torch.testing.assert_close(on_policy_grad(aggregation, FOUR_BY_TWO, beta=beta), whole)
    torch.testing.assert_close(on_policy_grad(aggregation, THREE_FIVE, beta=beta), whole)
    torch.testing.assert_close(on_policy_grad(aggregation, TWO_RANKS, world_size=2, beta=beta), whole)
    torch.testing.assert_close(on_policy_grad(aggregation, [[0, 1, 2, 3], [4, 5, 6, 7]], world_size=2, beta=beta), whole)


def test_grpo_is_invariant_to_equal_splits_only():
    whole = on_policy_grad("grpo", ONE)
    torch.testing.assert_close(on_policy_grad("grpo", FOUR_BY_TWO), whole)
    torch.testing.assert_close(on_policy_grad("grpo", TWO_RANKS, world_size=2), whole)
    unequal = on_policy_grad("grpo", THREE_FIVE)
    assert not torch.allclose(unequal, whole)
    # 3 + 5: a completion of the first micro-batch counts 8/6, one of the second 8/10 as much as in one of 8
    # (grpo's per-micro-batch mean over 3, then over 2 micro-batches, against one mean over 8)
    pulled = whole[:, 0] != 0  # the first token of every completion with a non-zero advantage
    expected = torch.tensor([8 / (3 * 2)] * 3 + [8 / (5 * 2)] * 5, dtype=torch.float64)
    torch.testing.assert_close(unequal[pulled, 0] / whole[pulled, 0], expected[pulled])


def test_grpo_weights_each_token_by_one_over_its_completions_length():
    """Two completions with the same advantage: dapo pulls every token equally; grpo pulls a
    3-token completion's tokens 64/3 times harder than a 64-token completion's (its length bias)."""
    grpo = on_policy_grad("grpo", ONE)
    dapo = on_policy_grad("dapo", ONE)
    a = hand_advantages(REWARDS, GROUP, "group")
    assert a[0] == a[2] and a[0] != 0  # completions 0 (3 tokens) and 2 (5 tokens) share an advantage
    assert float(grpo[0, 0] / grpo[2, 0]) == pytest.approx(5 / 3)
    assert float(dapo[0, 0] / dapo[2, 0]) == pytest.approx(1.0)
    # per completion, grpo's total pull is the same whatever its length; dapo's grows with it
    assert float(grpo[0].sum() / grpo[2].sum()) == pytest.approx(1.0)
    assert float(dapo[0].sum() / dapo[2].sum()) == pytest.approx(3 / 5)


def test_bnpo_changes_with_the_split():
    whole = on_policy_grad("bnpo", ONE)
    assert torch.allclose(on_policy_grad("dapo", ONE), whole)  # one micro-batch: bnpo == dapo
    assert not torch.allclose(on_policy_grad("bnpo", FOUR_BY_TWO), whole)
    assert not torch.allclose(on_policy_grad("bnpo", THREE_FIVE), whole)


# --------------------------------------------------------------------------- zero advantage, no tokens


@pytest.mark.parametrize("aggregation", ["dapo", "dr_grpo", "grpo", "bnpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_zero_advantage_group_gets_zero_gradient_and_nothing_is_nan(aggregation, level):
    mask = completion_mask()
    advantages, zero_std = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), GROUP)
    logps = leaf_logps(8)
    losses, _ = grpo_token_losses(logps, None, advantages, mask, importance_sampling_level=level)
    aggregate_grpo_loss(losses, mask, aggregation, max_completion_length=MAX_LEN).backward()
    assert zero_std.tolist() == [False, True]
    assert torch.isfinite(logps.grad).all()
    assert (logps.grad[4:] == 0).all()
    assert (logps.grad[:4][mask[:4]] != 0).any()


@pytest.mark.parametrize("aggregation", ["dapo", "dr_grpo", "grpo", "bnpo"])
def test_no_completion_tokens_gives_a_zero_loss_in_the_graph(aggregation):
    mask = torch.zeros(2, 5, dtype=torch.bool)
    logps = leaf_logps(9, rows=2, width=5)
    losses, stats = grpo_token_losses(logps, None, torch.zeros(2, dtype=torch.float64), mask, beta=0.1,
                                      ref_logps=logps.detach() - 1)
    loss = aggregate_grpo_loss(losses, mask, aggregation, num_step_tokens=0, num_step_completions=0,
                               max_completion_length=4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(logps.grad).all() and (logps.grad == 0).all()
    assert all(torch.isfinite(v) for v in stats.values())
    empty = aggregate_grpo_loss(losses[:0], mask[:0], aggregation, max_completion_length=4)
    assert float(empty.detach()) == 0.0


def test_bad_options_are_named():
    mask = completion_mask()
    losses = torch.zeros(mask.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="loss_aggregation"):
        aggregate_grpo_loss(losses, mask, "token_mean")
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_grpo_loss(losses, mask, "dr_grpo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        importance_log_weights(losses, losses, mask, "seq")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_token_losses(losses, None, torch.zeros(8, dtype=torch.float64), mask, beta=0.1)
    with pytest.raises(ValueError, match="epsilon"):
        clipped_policy_loss(losses, torch.zeros(8), -0.1)
