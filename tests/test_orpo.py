"""ORPO: the odds-ratio term, both NLL scopes, the step normalisation, and TRL 1.16's odds_ratio_loss.

References are written out here in float64: token log-probs by a plain loop over `log_softmax` of
the model's logits, odds as p / (1 - p) with p = exp(mean log-prob).
"""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from llmstages.data import PreferenceData
from llmstages.data.preference import with_prompt_labels
from llmstages.losses import IGNORE_INDEX, count_targets, log1mexp, orpo_log_odds
from llmstages.stages import ORPOModule
from llmstages.stages.reference import ReferenceStage

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec"),
]


def preference_data(cache_dir: str, **kwargs) -> PreferenceData:
    data = PreferenceData(cache_dir=cache_dir, **{"batch_size": 8, "shuffle": False, "seq_len": 128, **kwargs})
    data.setup("fit")
    return data


def batch_of(data, rows) -> dict:
    return data.collate([data.train_set[i] for i in rows])


def loop_logps(model, input_ids, labels) -> list[dict[int, float]]:
    """Per row, {position t: log p(token t | tokens < t)} for every labelled t, in float64, by a plain loop."""
    with torch.no_grad():
        logits = model(input_ids).double()
    out = []
    for b in range(input_ids.shape[0]):
        row = {}
        for t in range(1, input_ids.shape[1]):
            if labels[b, t] != IGNORE_INDEX:
                row[t] = float(F.log_softmax(logits[b, t - 1], dim=-1)[input_ids[b, t]])
        out.append(row)
    return out


# --------------------------------------------------------------------------- the odds


def test_log1mexp_is_accurate_where_the_naive_form_is_not():
    xs = [-1e-9, -1e-6, -1e-3, -0.5, -0.6931, -0.6932, -3.0, -40.0]
    got = log1mexp(torch.tensor(xs, dtype=torch.float32))
    for x, value in zip(xs, got.tolist()):
        assert value == pytest.approx(math.log(-math.expm1(x)), rel=1e-5)
    naive = torch.log1p(-torch.exp(torch.tensor(-1e-9, dtype=torch.float32)))
    assert math.isinf(float(naive))  # exp(-1e-9) rounds to 1 in float32: the naive form's -inf (ColossalAI #6407)


def test_log_odds_are_the_log_odds_ratio_of_the_mean_probabilities():
    g = torch.Generator().manual_seed(0)
    chosen = -torch.rand(16, generator=g, dtype=torch.float64) * 4
    rejected = -torch.rand(16, generator=g, dtype=torch.float64) * 4
    got = orpo_log_odds(chosen, rejected)
    for c, r, value in zip(chosen.tolist(), rejected.tolist(), got.tolist()):
        odds = lambda logp: math.exp(logp) / (1 - math.exp(logp))  # noqa: E731
        assert value == pytest.approx(math.log(odds(c) / odds(r)), rel=1e-10)


def test_odds_ratio_term_equals_trls_odds_ratio_loss():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    g = torch.Generator().manual_seed(1)
    chosen = -torch.rand(32, generator=g) * 3 - 1e-7
    rejected = -torch.rand(32, generator=g) * 3 - 1e-7
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = orpo.ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    ours = orpo_log_odds(chosen, rejected)
    torch.testing.assert_close(0.25 * F.logsigmoid(ours), losses)
    torch.testing.assert_close(ours.mean(), log_odds)
    torch.testing.assert_close(F.logsigmoid(ours).mean(), ratio)


# --------------------------------------------------------------------------- the stage's loss


@pytest.mark.parametrize("scope", ["completion", "prompt_and_completion"])
def test_orpo_loss_is_nll_minus_beta_logsigmoid_log_odds(cache_dir, scope):
    data = preference_data(cache_dir)
    module = ORPOModule(preset="tiny", vocab_size=data.vocab_size, beta=0.3, nll_scope=scope).double()
    batch = batch_of(data, range(4))
    loss, stats, weight = module.compute_loss(batch)
    assert weight == 4
    nll_tokens, means = [], {}
    for side in ("chosen", "rejected"):
        ids, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
        rows = loop_logps(module.backbone, ids, labels)
        means[side] = [sum(r.values()) / len(r) for r in rows]
        if side == "chosen":
            for b, row in enumerate(rows):
                last = max(row)  # the reply's last token
                if scope == "completion":
                    nll_tokens += [-v for v in row.values()]
                else:  # every token from the second up to the reply's end: prompt and reply
                    scored = loop_logps(module.backbone, ids[b : b + 1], torch.where(torch.arange(ids.shape[1]) <= last, ids[b], -100)[None])[0]
                    nll_tokens += [-v for v in scored.values()]
    nll = sum(nll_tokens) / len(nll_tokens)
    odds = [
        (c - r) - (math.log(-math.expm1(c)) - math.log(-math.expm1(r))) for c, r in zip(means["chosen"], means["rejected"])
    ]
    ratio = sum(math.log(1 / (1 + math.exp(-o))) for o in odds) / len(odds)
    assert float(loss.detach()) == pytest.approx(float(nll) - 0.3 * ratio, rel=1e-9)
    assert float(stats["nll_loss"]) == pytest.approx(float(nll), rel=1e-9)
    assert float(stats["log_odds_chosen"]) == pytest.approx(sum(odds) / len(odds), rel=1e-9)
    assert float(stats["logps/chosen"]) == pytest.approx(float(sum(means["chosen"]) / 4), rel=1e-9)


def test_the_two_nll_scopes_differ_by_the_prompt_tokens(cache_dir):
    data = preference_data(cache_dir)
    batch = batch_of(data, range(8))
    wide = with_prompt_labels(batch["chosen_input_ids"], batch["chosen_labels"])
    reply = batch["chosen_labels"]
    assert count_targets(wide) > count_targets(reply)
    assert bool((wide[reply != IGNORE_INDEX] == reply[reply != IGNORE_INDEX]).all())  # the reply stays labelled
    lengths = (reply != IGNORE_INDEX).long().cumsum(1).argmax(1)  # the reply's last labelled position
    for b in range(len(reply)):
        assert bool((wide[b, : lengths[b] + 1] == batch["chosen_input_ids"][b, : lengths[b] + 1]).all())
        assert bool((wide[b, lengths[b] + 1 :] == IGNORE_INDEX).all())  # padding after the reply is never trained


def test_orpo_builds_no_reference(cache_dir):
    data = preference_data(cache_dir)
    module = ORPOModule(preset="tiny", vocab_size=data.vocab_size)
    module.setup("fit")
    assert not isinstance(module, ReferenceStage)
    assert all(key.startswith("backbone.") for key in module.state_dict())


# --------------------------------------------------------------------------- the step


def split_step(module, data, splits):
    """(gradients, train/step_loss) of one step whose pairs 0..7 are split into micro-batches `splits`."""
    module.zero_grad()
    batches = [batch_of(data, rows) for rows in splits]
    counts = [data._count(b) for b in batches]
    weighted, pairs = 0.0, 0
    for b in batches:
        b["num_step_tokens"] = torch.tensor(sum(c[0] for c in counts))
        b["num_step_sequences"] = torch.tensor(sum(c[1] for c in counts))
        loss, stats, weight = module.compute_loss(b)
        loss.backward()
        weighted, pairs = weighted + float(stats["loss"]) * weight, pairs + weight
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return grads, weighted / pairs


@pytest.mark.parametrize("scope", ["completion", "prompt_and_completion"])
def test_one_steps_gradient_and_step_loss_do_not_depend_on_the_split(cache_dir, scope):
    data = preference_data(cache_dir)
    data.sft_scope = scope
    module = ORPOModule(preset="tiny", vocab_size=data.vocab_size, nll_scope=scope, beta=0.5).double()
    whole, whole_loss = split_step(module, data, [range(8)])
    for splits in ([range(3), range(3, 8)], [range(4), range(4, 8)]):
        grads, step_loss = split_step(module, data, splits)
        assert step_loss == pytest.approx(whole_loss, rel=1e-10)
        for name in whole:
            torch.testing.assert_close(grads[name], whole[name], rtol=1e-9, atol=1e-12)
    module.hparams.normalize = "micro_batch"  # the control: a mean per micro-batch depends on the split
    grads, _ = split_step(module, data, [range(3), range(3, 8)])
    assert not all(torch.allclose(grads[n], whole[n]) for n in whole)


@pytest.mark.parametrize("scope", ["completion", "prompt_and_completion"])
def test_a_run_counts_the_tokens_its_nll_trains(cache_dir, scope):
    """The stage tells its data which tokens the NLL trains: with the prompt counted too, the step's
    token count covers every micro-batch's tokens (a smaller count is an error in `reduce_token_loss`)."""
    data = PreferenceData(cache_dir=cache_dir, batch_size=2, seq_len=96, shuffle=False)
    module = ORPOModule(preset="tiny", vocab_size=data.vocab_size, nll_scope=scope)
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, max_steps=2,
              accumulate_grad_batches=2).fit(module, data)
    assert data.sft_scope == scope
    assert math.isfinite(float(module.trainer.callback_metrics["train/step_loss"]))
