"""GRPO's newer loss types (cispo, sapo, luspo, vespo) and the two-sided clip `delta`.

Each is checked three ways: against its formula written out here in float64 (value and gradient
with respect to the per-token log-probs, off-policy so the ratio is not 1), against TRL 1.16's own
`GRPOTrainer._compute_loss` on the same log-probs (skipped when `trl` is not installed; it needs no
model: the log-probs are handed to it), and in the batch-split class its normaliser puts it in.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llmstages.stages.grpo.loss import aggregate_grpo_loss, group_advantages, grpo_token_losses, vespo_weights

LENGTHS = [3, 12, 5, 9, 3, 12, 7, 10]
REWARDS = [1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.25, 1.0]
GROUP = 4
WIDTH = 12
NEW_TYPES = ["cispo", "sapo", "luspo", "vespo"]


def completion_mask() -> torch.Tensor:
    return torch.arange(WIDTH)[None, :] < torch.tensor(LENGTHS)[:, None]


def logps_pair(seed: int = 0):
    """(policy log-probs as a leaf, old-policy log-probs): ratios spread around 1, some beyond any clip."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(len(LENGTHS), WIDTH, generator=g, dtype=torch.float64) * 2 - 0.1
    new = (old + torch.randn(len(LENGTHS), WIDTH, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    return new, old


def advantages() -> torch.Tensor:
    return group_advantages(torch.tensor(REWARDS, dtype=torch.float64), GROUP)[0]


def ours(loss_type, logps, old, adv, mask, level="token", splits=None, **options):
    """The step's loss as this project computes it, micro-batch by micro-batch (backward on each)."""
    splits = splits or [list(range(len(LENGTHS)))]
    total = 0.0
    for rows in splits:
        rows = torch.tensor(rows)
        losses, _ = grpo_token_losses(logps[rows], old[rows], adv[rows], mask[rows], loss_type=loss_type,
                                      importance_sampling_level=level, **options)
        loss = aggregate_grpo_loss(losses, mask[rows], loss_type, num_step_tokens=int(mask.sum()),
                                   num_step_completions=len(LENGTHS), max_completion_length=WIDTH,
                                   accumulation_steps=len(splits))
        loss.backward()
        total += float(loss.detach())
    return total


# --------------------------------------------------------------------------- formulas, written out


def expected_per_token(loss_type, logps, old, adv, mask, eps=0.2, eps_high=0.2, delta=None, level="token"):
    """Per-token losses `[B, T]` straight from the papers' / TRL's definitions (float64)."""
    a = adv[:, None]
    log_ratio = (logps - old) * mask
    if level == "sequence":
        log_ratio = (log_ratio.sum(-1) / mask.sum(-1))[:, None]
    r = torch.exp(log_ratio)
    if loss_type == "cispo":
        return -torch.minimum(r, torch.full_like(r, eps_high)).detach() * a * logps
    if loss_type == "sapo":
        tau = torch.where(a > 0, 1.0, 1.05).double()
        return -(1 / (1 + torch.exp(-tau * (r - 1)))) * 4 / tau * a
    if loss_type == "vespo":
        s = ((logps - old).clamp(-20, 20) * mask).sum(-1, keepdim=True).clamp(math.log(1e-8), 20).detach()
        k = torch.where(a >= 0, 2.0, 3.0).double()
        lam = torch.where(a >= 0, 3.0, 2.0).double()
        w = torch.exp(s)
        phi = math.e ** lam * w ** k * torch.exp(-lam * w)  # e^lambda w^k e^(-lambda w)
        return -phi * a * logps
    unclipped = r if delta is None else torch.minimum(r, torch.full_like(r, delta))
    return -torch.minimum(unclipped * a, r.clamp(1 - eps, 1 + eps_high) * a)


def expected_loss(loss_type, per_token, mask):
    per_token = torch.where(mask, per_token.expand_as(mask), 0.0)
    if loss_type in ("cispo", "vespo", "dapo"):
        return per_token.sum() / mask.sum()
    if loss_type == "sapo":
        return (per_token.sum(-1) / mask.sum(-1)).mean()
    if loss_type == "luspo":
        return per_token.sum(-1).mean()
    raise AssertionError(loss_type)


# vespo weights the summed token log-ratios itself: token level only (the stage rejects sequence, TRL warns)
LEVELS = [(t, level) for t in NEW_TYPES for level in ("token", "sequence") if (t, level) != ("vespo", "sequence")]


@pytest.mark.parametrize("loss_type,level", LEVELS)
def test_new_loss_types_match_their_formulas_in_value_and_gradient(loss_type, level):
    mask, adv = completion_mask(), advantages()
    logps, old = logps_pair(1)
    value = ours(loss_type, logps, old, adv, mask, level, epsilon_high=5.0 if loss_type == "cispo" else None)
    got = logps.grad.clone()
    logps.grad = None
    per_token = expected_per_token(loss_type, logps, old, adv, mask, eps_high=5.0 if loss_type == "cispo" else 0.2,
                                   level=level)
    loss = expected_loss(loss_type, per_token, mask)
    loss.backward()
    assert value == pytest.approx(float(loss.detach()), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(got, logps.grad, rtol=1e-10, atol=1e-12)


def test_cispo_caps_the_detached_weight_absolutely_and_passes_the_plain_policy_gradient():
    """CISPO's gradient is min(r, eps_high) * A * d log pi, also where PPO's clip would have zeroed it."""
    mask, adv = completion_mask(), advantages()
    logps, old = logps_pair(2)
    ours("cispo", logps, old, adv, mask, epsilon_high=1.1)
    r = torch.exp(logps.detach() - old)
    expected = torch.where(mask, -torch.minimum(r, torch.tensor(1.1)) * adv[:, None] / mask.sum(), 0.0)
    torch.testing.assert_close(logps.grad, expected)
    assert bool(((r > 1.1) & mask & (adv[:, None] != 0)).any())  # some weights were capped


def test_delta_clamps_the_unclipped_ratio_from_above():
    mask, adv = completion_mask(), advantages()
    logps, old = logps_pair(3)
    ours("dapo", logps, old, adv, mask, delta=1.3)
    with_delta = logps.grad.clone()
    logps.grad = None
    ours("dapo", logps, old, adv, mask)
    plain = logps.grad.clone()
    r = torch.exp(logps.detach() - old)
    # a negative advantage with r > delta: min(r A, clip A) picks r A without delta (gradient), delta A with it (none)
    capped = mask & (r > 1.3) & (adv[:, None] < 0)
    assert bool(capped.any())
    assert bool((plain[capped] != 0).all()) and bool((with_delta[capped] == 0).all())
    torch.testing.assert_close(with_delta[~capped], plain[~capped])
    logps.grad = None
    per_token = expected_per_token("dapo", logps, old, adv, mask, delta=1.3)
    torch.where(mask, per_token, 0.0).sum().div(mask.sum()).backward()
    torch.testing.assert_close(with_delta, logps.grad)


def test_vespo_weight_is_one_on_policy_and_detached():
    mask = completion_mask()
    adv = advantages()
    zero = torch.zeros(len(LENGTHS), WIDTH, dtype=torch.float64)
    torch.testing.assert_close(vespo_weights(zero, adv, mask), torch.ones(len(LENGTHS), 1, dtype=torch.float64))
    assert not vespo_weights(zero.requires_grad_(True), adv, mask).requires_grad


# --------------------------------------------------------------------------- batch-split classes


SPLIT_INVARIANT = ["cispo", "vespo"]  # dapo's normaliser: one divisor for the whole step
SPLIT_DEPENDENT = ["sapo", "luspo"]  # a mean over each micro-batch's completions: equal splits only
THREE_FIVE = [[0, 1, 2], [3, 4, 5, 6, 7]]
FOUR_FOUR = [[0, 1, 2, 3], [4, 5, 6, 7]]


def split_grad(loss_type, splits, **options):
    mask, adv = completion_mask(), advantages()
    logps, old = logps_pair(4)
    ours(loss_type, logps, old, adv, mask, splits=splits, **options)
    return logps.grad


@pytest.mark.parametrize("loss_type", SPLIT_INVARIANT)
def test_cispo_and_vespo_do_not_depend_on_the_split(loss_type):
    whole = split_grad(loss_type, None)
    torch.testing.assert_close(split_grad(loss_type, THREE_FIVE), whole)
    torch.testing.assert_close(split_grad(loss_type, FOUR_FOUR), whole)


@pytest.mark.parametrize("loss_type", SPLIT_DEPENDENT)
def test_sapo_and_luspo_hold_for_equal_splits_only(loss_type):
    """The documented control: like grpo, their per-micro-batch mean weights an unequal split's completions unequally."""
    whole = split_grad(loss_type, None)
    torch.testing.assert_close(split_grad(loss_type, FOUR_FOUR), whole)
    assert not torch.allclose(split_grad(loss_type, THREE_FIVE), whole)


def test_delta_keeps_dapo_split_invariant():
    whole = split_grad("dapo", None, delta=1.3)
    torch.testing.assert_close(split_grad("dapo", THREE_FIVE, delta=1.3), whole)


# --------------------------------------------------------------------------- TRL 1.16 itself


def trl_loss(loss_type, logps, old, adv, mask, level="token", beta=0.0, ref=None, **args):
    """TRL's `GRPOTrainer._compute_loss` on these log-probs: no model, the log-probs are handed to it."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    options = {"delta": None, "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05, "vespo_k_pos": 2.0,
               "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0,
               "use_bias_correction_kl": False, **args}
    accelerator = SimpleNamespace(
        num_processes=1, device=logps.device, gather=lambda t: t.reshape(-1) if t.dim() == 0 else t,
        gather_for_metrics=lambda t: t, reduce=lambda t, reduction="sum": t, sync_gradients=True,
    )
    epsilon_high = options.pop("epsilon_high", 0.2)
    fake = SimpleNamespace(
        args=SimpleNamespace(**options, steps_per_generation=1), accelerator=accelerator, model=SimpleNamespace(training=True),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=epsilon_high, use_vllm=False,
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        max_completion_length=WIDTH, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        get_gamma_weights=trl_grpo.GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(len(LENGTHS), 1, dtype=torch.long), "prompt_mask": torch.ones(len(LENGTHS), 1),
        "completion_ids": torch.zeros(len(LENGTHS), WIDTH, dtype=torch.long), "completion_mask": mask.double(),
        "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum().double(),
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)


CASES = [("cispo", "token", {"epsilon_high": 5.0}), ("cispo", "sequence", {"epsilon_high": 1.1}),
         ("sapo", "token", {}), ("sapo", "sequence", {}), ("luspo", "sequence", {}), ("luspo", "token", {}),
         ("vespo", "token", {}), ("dapo", "token", {"delta": 1.3}), ("grpo", "sequence", {"delta": 1.3}),
         ("bnpo", "token", {}), ("dr_grpo", "token", {})]


@pytest.mark.parametrize("loss_type,level,options", CASES)
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_every_loss_type_gives_trls_loss_and_gradient(loss_type, level, options, beta):
    mask, adv = completion_mask(), advantages()
    logps, old = logps_pair(5)
    ref = (old + 0.1).detach()
    trl = trl_loss(loss_type, logps, old, adv, mask, level, beta=beta, ref=ref if beta else None, **options)
    trl.backward()
    trl_grad = logps.grad.clone()
    logps.grad = None
    value = ours(loss_type, logps, old, adv, mask, level, beta=beta, ref_logps=ref if beta else None, **options)
    assert value == pytest.approx(float(trl.detach()), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(logps.grad * mask, trl_grad * mask, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- options, named


@pytest.mark.parametrize("options,message", [
    ({"delta": 0.9}, "delta"), ({"loss_aggregation": "cispo", "delta": 2.0}, "delta"),
    ({"loss_aggregation": "vespo", "importance_sampling_level": "sequence"}, "vespo"),
    ({"sapo_temperature_neg": 0.0}, "sapo_temperature"), ({"reward_errors": "ignore"}, "reward_errors"),
    ({"loss_aggregation": "ppo"}, "loss_aggregation"),
])
def test_bad_grpo_options_are_named(options, message):
    from llmstages.stages import GRPOModule

    with pytest.raises(ValueError, match=message):
        GRPOModule(preset="tiny", vocab_size=64, **options)
