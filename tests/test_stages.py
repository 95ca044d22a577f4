"""Behaviour tests for the four training stages (pretrain, SFT, reward model, DPO).

Design choices:
- Everything runs on the `tiny` preset with the embedded synthetic data and
  the default tokenizer, cached once per session in a temporary folder.
- Every invariant is checked against a reference written out here (a hand
  computation, or the same global batch run another way), and where a test
  could pass vacuously a negative control shows that the compared quantity
  does react (cross-document attention, `micro_batch` normalisation, tokens
  before the reward position, `legacy_mean_padded`).
- Exactness tests use weights larger than the init's (std 0.02 makes every
  output nearly uniform, hiding bugs below float tolerance).
- Gradients of one optimiser step are captured in `on_before_optimizer_step`,
  after Lightning's accumulation and DDP's all-reduce, before AdamW touches them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch

from helpers import sharpen
from llmstages.data import synthetic
from llmstages.data import PreferenceData, PretrainData, SFTData
from llmstages.data.packing import IGNORE_INDEX, pack_examples, pad_examples, stack_rows
from llmstages.losses import NoTargetTokensWarning, count_targets, target_mask
from llmstages.model.config import ModelConfig
from llmstages.stages import DPOModule, PretrainModule, RewardModule, SFTModule

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec"),  # Lightning 2.6 on torch 2.13
]


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: these models are tiny, and on a shared 2-core machine OpenMP's
    spinning threads make every small op ~30x slower than running on one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def sft_data(cache_dir: str, **kwargs) -> SFTData:
    kwargs = {"packing": "none", "batch_size": 8, "shuffle": False, "seq_len": 256, **kwargs}
    data = SFTData(cache_dir=cache_dir, **kwargs)
    data.setup("fit")
    return data


def preference_data(cache_dir: str, **kwargs) -> PreferenceData:
    data = PreferenceData(cache_dir=cache_dir, **{"batch_size": 8, "shuffle": False, "seq_len": 256, **kwargs})
    data.setup("fit")
    return data


def make_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**defaults, **kwargs})



def targets_per_document(logps: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor | None) -> list[float]:
    """Per-example summed log-prob of the targets: per row, or per (row, document) in row order.

    A target at position t predicts token t + 1, so it belongs to token t + 1's document.
    """
    mask = target_mask(labels)
    out = []
    for row in range(labels.shape[0]):
        if document_ids is None:
            out.append(logps[row][mask[row]].sum())
            continue
        docs = torch.full_like(document_ids[row], -1)
        docs[:-1] = document_ids[row, 1:]
        for doc in range(int(document_ids[row].max()) + 1):
            out.append(logps[row][mask[row] & (docs == doc)].sum())
    return out


class GradCapture(L.Callback):
    """Records the batches of the first optimiser step and the gradients right before it."""

    def __init__(self, save_to: str | None = None) -> None:
        self.save_to = save_to
        self.grads: dict[str, torch.Tensor] | None = None
        self.batches: list[tuple[int, int]] = []  # (rows, num_step_tokens) per micro-batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((int(batch["input_ids"].shape[0]), int(batch["num_step_tokens"])))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.grads is not None:
            return
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        if self.save_to is not None:
            torch.save(
                {"grads": self.grads, "batches": self.batches}, f"{self.save_to}.rank{trainer.global_rank}.pt"
            )


def assert_grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol=1e-4, atol=1e-6) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol=1e-4, atol=1e-6) -> bool:
    return all(torch.allclose(a[n], b[n], rtol=rtol, atol=atol) for n in a)


def hand_grads(module: SFTModule, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Reference for `normalize: token`: grad of (summed token NLL of all examples) / (their target count)."""
    module.zero_grad(set_to_none=True)
    batch = pad_examples(examples, pad_id)
    logps = module.target_logps(batch["input_ids"], batch["labels"], batch["position_ids"])
    (-logps.sum() / count_targets(batch["labels"])).backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


def one_step_grads(
    cache_dir: str, state: dict, normalize: str, batch_size: int, accumulate: int, **trainer_kwargs
) -> GradCapture:
    data = sft_data(cache_dir, batch_size=batch_size)
    module = SFTModule(preset="tiny", vocab_size=data.vocab_size, normalize=normalize, generate_samples=0)
    module.load_state_dict(state)
    capture = GradCapture(trainer_kwargs.pop("save_to", None))
    make_trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[capture], **trainer_kwargs).fit(module, data)
    return capture


# --------------------------------------------------------------------------- 1. packed == unpacked


def test_packed_and_unpacked_sft_give_same_losses_and_gradients(cache_dir: str) -> None:
    data = sft_data(cache_dir)
    examples = [data.train_set[i] for i in range(7)]
    assert len({len(e["input_ids"]) for e in examples}) > 2  # padding really differs per row
    module = SFTModule(preset="tiny", vocab_size=data.vocab_size)
    sharpen(module)
    pad = data.tokenizer.pad_id

    def nll_and_grads(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        module.zero_grad(set_to_none=True)
        logps = module.target_logps(
            batch["input_ids"], batch["labels"], batch["position_ids"], batch.get("document_ids")
        )
        per_example = -torch.stack(targets_per_document(logps, batch["labels"], batch.get("document_ids")))
        per_example.sum().backward()
        return per_example.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}

    unpacked = pad_examples(examples, pad)
    bins = [[0, 1, 2], [3, 4, 5, 6]]  # documents appear in example order
    seq_len = max(sum(len(examples[i]["input_ids"]) for i in b) for b in bins) + 5  # trailing padding too
    packed = stack_rows([pack_examples(examples, b, seq_len, pad) for b in bins])
    assert count_targets(packed["labels"]) == count_targets(unpacked["labels"])

    nll_u, grads_u = nll_and_grads(unpacked)
    nll_p, grads_p = nll_and_grads(packed)
    torch.testing.assert_close(nll_p, nll_u, rtol=0, atol=1e-5)
    assert_grads_close(grads_p, grads_u, rtol=1e-4, atol=1e-5)

    # Negative control: the same rows without document isolation (attention and positions run
    # across documents) must give different losses, or the comparison above proves nothing.
    leaky = {k: v for k, v in packed.items() if k not in ("document_ids", "position_ids")}
    logps = module.target_logps(leaky["input_ids"], leaky["labels"])
    nll_leaky = -torch.stack(targets_per_document(logps, packed["labels"], packed["document_ids"])).detach()
    assert (nll_leaky - nll_u).abs().max() > 1e-2


# --------------------------------------------------------------------------- 2. accumulation invariance


def test_token_normalisation_is_invariant_to_gradient_accumulation(cache_dir: str) -> None:
    data = sft_data(cache_dir)
    examples = [data.train_set[i] for i in range(8)]  # shuffle=False: the first step's examples
    counts = [count_targets(pad_examples([e], 1)["labels"]) for e in examples]
    pair_counts = [counts[i] + counts[i + 1] for i in range(0, 8, 2)]
    assert len(set(pair_counts)) > 1, "micro-batches need different target counts for this test to bite"

    module = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0)
    sharpen(module)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    reference = hand_grads(module, examples, data.tokenizer.pad_id)

    whole = one_step_grads(cache_dir, state, "token", batch_size=8, accumulate=1)
    split = one_step_grads(cache_dir, state, "token", batch_size=2, accumulate=4)
    assert whole.batches == [(8, sum(counts))]
    assert split.batches == [(2, sum(counts))] * 4  # every micro-batch knows the whole step's count
    assert_grads_close(whole.grads, reference)
    assert_grads_close(split.grads, reference)

    # micro_batch (pre-fix Hugging Face): the mean of per-micro-batch means depends on the split.
    whole_mb = one_step_grads(cache_dir, state, "micro_batch", batch_size=8, accumulate=1)
    split_mb = one_step_grads(cache_dir, state, "micro_batch", batch_size=2, accumulate=4)
    assert_grads_close(whole_mb.grads, reference)  # one micro-batch: the same thing
    assert not grads_close(split_mb.grads, reference)
    worst = max(float((split_mb.grads[n] - reference[n]).abs().max() / reference[n].abs().max()) for n in reference)
    assert worst > 1e-2


# --------------------------------------------------------------------------- 3. DDP


@pytest.mark.distributed
def test_token_normalisation_is_invariant_across_ddp_ranks(cache_dir: str, tmp_path: Path) -> None:
    data = sft_data(cache_dir)
    examples = [data.train_set[i] for i in range(8)]
    module = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0)
    sharpen(module)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    reference = hand_grads(module, examples, data.tokenizer.pad_id)

    # DistributedSampler(shuffle=False) interleaves: rank 0 sees 0, 2, 4, 6 and rank 1 sees
    # 1, 3, 5, 7, so two ranks x two micro-batches of two cover exactly examples 0..7.
    prefix = str(tmp_path / "grads")
    one_step_grads(
        cache_dir, state, "token", batch_size=2, accumulate=2,
        save_to=prefix, strategy="ddp_spawn", devices=2,
    )
    ranks = [torch.load(f"{prefix}.rank{r}.pt") for r in (0, 1)]
    total = sum(count_targets(pad_examples([e], 1)["labels"]) for e in examples)
    for saved in ranks:
        # the stage sums the local step counts over ranks; each rank's loader holds only its own share
        assert [rows for rows, _ in saved["batches"]] == [2, 2]
        assert_grads_close(saved["grads"], reference)
    assert sum(saved["batches"][0][1] for saved in ranks) == total


# --------------------------------------------------------------------------- 4. DPO


def pad_preference_batch(batch: dict, extra: int, pad_id: int) -> dict:
    """The same pairs with `extra` more padding on the right (positions keep counting)."""
    out = dict(batch)
    for side in ("chosen", "rejected"):
        ids, labels = batch[f"{side}_input_ids"], batch[f"{side}_labels"]
        rows = ids.shape[0]
        out[f"{side}_input_ids"] = torch.cat([ids, torch.full((rows, extra), pad_id)], 1)
        out[f"{side}_labels"] = torch.cat([labels, torch.full((rows, extra), IGNORE_INDEX)], 1)
        out[f"{side}_position_ids"] = torch.arange(ids.shape[1] + extra).expand(rows, -1).clone()
    return out


def test_dpo_at_initialisation_loss_is_log2_and_rewards_zero(cache_dir: str) -> None:
    data = preference_data(cache_dir)
    module = DPOModule(preset="tiny", vocab_size=data.vocab_size)
    sharpen(module)  # before setup: the reference copies these weights
    module.setup("fit")
    batch = data.collate([data.train_set[i] for i in range(8)])
    loss, stats, n = module.compute_loss(batch)
    assert n == 8 and loss.dtype == torch.float32  # float64 step counts must not promote the loss
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)), rtol=0, atol=1e-6)
    ref_c, ref_r, _ = module.pair_logps(batch, module._reference)
    pol_c, pol_r, _ = module.pair_logps(batch)
    assert torch.equal(pol_c, ref_c) and torch.equal(pol_r, ref_r)  # so every pair's rewards are 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(stats[key]) == 0.0, key
    assert module._reference is not None and not any(p.requires_grad for p in module._reference.parameters())


def test_dpo_precomputed_reference_equals_live_reference(cache_dir: str) -> None:
    data = preference_data(cache_dir, batch_size=32)
    live = DPOModule(preset="tiny", vocab_size=data.vocab_size)
    sharpen(live)
    pre = DPOModule(preset="tiny", vocab_size=data.vocab_size, reference="precompute")
    pre.load_state_dict(live.state_dict())
    live.setup("fit")
    pre.setup("fit")
    pre.precompute_reference(data)
    assert pre._reference is None  # freed

    # The policy moves away from the reference; both modules move identically.
    moved = {k: v + 0.05 * torch.randn_like(v) for k, v in live.backbone.state_dict().items()}
    live.backbone.load_state_dict(moved)
    pre.backbone.load_state_dict(moved)

    for split, dataset, training in (("train", data.train_set, True), ("val", data.val_set, False)):
        live.train(training)
        pre.train(training)
        # rows 3..9 padded to a different length than in precompute's own batches
        batch = data.collate([dataset[i] for i in range(3, 9)])
        loss_live, stats_live, _ = live.compute_loss(batch)
        loss_pre, stats_pre, _ = pre.compute_loss(batch)
        assert abs(float(loss_live.detach()) - math.log(2.0)) > 1e-3, split  # the comparison is not trivial
        torch.testing.assert_close(loss_pre, loss_live, rtol=1e-5, atol=1e-5)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps_reduced/chosen", "rewards_reduced/margins"):
            torch.testing.assert_close(stats_pre[key], stats_live[key], rtol=1e-4, atol=1e-5)


def test_dpo_rewards_keep_trl_meaning_under_any_logp_reduction(cache_dir: str) -> None:
    """rewards/* and logps/* come from summed log-probs (TRL's meaning) even when the loss uses means (ipo);
    logps_reduced/* and rewards_reduced/* are what the loss compared."""
    data = preference_data(cache_dir)
    module = DPOModule(preset="tiny", vocab_size=data.vocab_size, loss_type="ipo", beta=0.5)
    sharpen(module)
    module.setup("fit")
    module.backbone.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in module.backbone.state_dict().items()})
    batch = data.collate([data.train_set[i] for i in range(8)])
    _, stats, _ = module.compute_loss(batch)

    def side_logps(model, side: str) -> tuple[torch.Tensor, torch.Tensor]:  # (sum, mean) by a plain loop
        labels = batch[f"{side}_labels"]
        logits = model(batch[f"{side}_input_ids"], position_ids=batch[f"{side}_position_ids"])
        logp = torch.log_softmax(logits.float(), -1)
        sums, means = [], []
        for row in range(len(labels)):
            picked = [logp[row, t, labels[row, t + 1]] for t in range(labels.shape[1] - 1) if labels[row, t + 1] != IGNORE_INDEX]
            sums.append(torch.stack(picked).sum())
            means.append(torch.stack(picked).mean())
        return torch.stack(sums).detach(), torch.stack(means).detach()

    (pc_sum, pc_mean), (pr_sum, pr_mean) = side_logps(module.backbone, "chosen"), side_logps(module.backbone, "rejected")
    (rc_sum, rc_mean), (rr_sum, rr_mean) = side_logps(module._reference, "chosen"), side_logps(module._reference, "rejected")
    rew_c, rew_r = 0.5 * (pc_sum - rc_sum), 0.5 * (pr_sum - rr_sum)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731
    close(stats["logps/chosen"], pc_sum.mean())
    close(stats["logps_reduced/chosen"], pc_mean.mean())
    close(stats["rewards/margins"], (rew_c - rew_r).mean())
    assert float(stats["rewards/accuracies"]) == float((rew_c > rew_r).float().mean())
    loss_c, loss_r = 0.5 * (pc_mean - rc_mean), 0.5 * (pr_mean - rr_mean)
    close(stats["rewards_reduced/margins"], (loss_c - loss_r).mean())
    assert float(stats["rewards_reduced/accuracies"]) == float((loss_c > loss_r).float().mean())
    # the two accuracies are different numbers on this batch: the metric names are not aliases
    assert float(stats["rewards/accuracies"]) != float(stats["rewards_reduced/accuracies"]) or not torch.allclose(
        stats["rewards/margins"], stats["rewards_reduced/margins"]
    )


def test_dpo_mean_reduction_ignores_padding_but_legacy_mean_padded_does_not(cache_dir: str) -> None:
    data = preference_data(cache_dir)
    batch = data.collate([data.train_set[i] for i in range(6)])
    extra = 11
    padded = pad_preference_batch(batch, extra, data.tokenizer.pad_id)
    length = batch["chosen_input_ids"].shape[1]

    mean = DPOModule(preset="tiny", vocab_size=data.vocab_size, logp_reduction="mean")
    sharpen(mean)
    legacy = DPOModule(preset="tiny", vocab_size=data.vocab_size, logp_reduction="legacy_mean_padded")
    legacy.load_state_dict(mean.state_dict())

    for a, b in zip(mean.pair_logps(batch)[:2], mean.pair_logps(padded)[:2]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(legacy.pair_logps(batch)[:2], legacy.pair_logps(padded)[:2]):
        # the sum is unchanged, the divisor is the padded length: a rescaled beta, not a mean
        torch.testing.assert_close(b, a * length / (length + extra), rtol=1e-5, atol=1e-6)
        assert (b - a).abs().min() > 1e-3


def test_simpo_trains_without_a_reference(cache_dir: str) -> None:
    data = preference_data(cache_dir)
    module = DPOModule(preset="tiny", vocab_size=data.vocab_size, loss_type="simpo", beta=2.0, gamma=0.5)
    module.setup("fit")
    assert module._reference is None and module.logp_reduction == "mean"
    batch = data.collate([data.train_set[i] for i in range(4)])
    loss, stats, _ = module.compute_loss(batch)
    # policies at init are nearly uniform and pi_c ~ pi_r, so the loss is about -logsigmoid(-gamma)
    assert torch.isfinite(loss)
    pol_c, pol_r, _ = module.pair_logps(batch)
    expected = -torch.nn.functional.logsigmoid(2.0 * (pol_c - pol_r) - 0.5).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


# --------------------------------------------------------------------------- 5. legacy_drop_first


def labelled_runs(labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive labelled positions."""
    runs: list[list[int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def test_legacy_drop_first_scores_one_token_fewer_per_reply(cache_dir: str) -> None:
    conversations = [c["messages"] for c in synthetic.sft_conversations(n=120, seed=3)]
    correct = sft_data(cache_dir, loss_mask="assistant", seq_len=512)
    legacy = sft_data(cache_dir, loss_mask="legacy_drop_first", seq_len=512)
    multi_turn = 0
    for messages in conversations:
        a, b = correct.encode(messages), legacy.encode(messages)
        assert a["input_ids"] == b["input_ids"]
        replies = sum(m["role"] == "assistant" for m in messages)
        multi_turn += replies > 1
        ta = count_targets(torch.tensor([a["labels"]]))
        tb = count_targets(torch.tensor([b["labels"]]))
        assert ta - tb == replies
        # exactly the first token of each reply is lost, nothing else
        runs = labelled_runs(a["labels"])
        assert len(runs) == replies
        expected = [IGNORE_INDEX if i in {r[0] for r in runs} else label for i, label in enumerate(a["labels"])]
        assert b["labels"] == expected
    assert multi_turn > 10


# --------------------------------------------------------------------------- 6. reward read position


def test_reward_is_read_at_the_last_labelled_token(cache_dir: str) -> None:
    data = preference_data(cache_dir)
    module = RewardModule(preset="tiny", vocab_size=data.vocab_size)
    sharpen(module)
    module.eval()
    batch = data.collate([data.train_set[i] for i in range(6)])
    ids, labels, pos = batch["rejected_input_ids"], batch["rejected_labels"], batch["rejected_position_ids"]
    rows = torch.arange(len(ids))
    last = torch.tensor([max(i for i, v in enumerate(row.tolist()) if v != IGNORE_INDEX) for row in labels])
    assert (last < ids.shape[1] - 1).any(), "need right padding in at least one row"
    # the reward sits on the reply's end-of-turn token
    assert (ids[rows, last] == data.template.stop_token_id(data.tokenizer)).all()

    with torch.no_grad():
        rewards = module.rewards(ids, labels, pos)
        hidden = module.backbone.hidden_states(ids, pos)
        by_hand = hidden[rows, last] @ module.value_head.weight[0]
        torch.testing.assert_close(rewards, by_hand, rtol=1e-5, atol=1e-6)

        # anything after the read position (padding, or a labelled pad) changes nothing
        after = torch.arange(ids.shape[1])[None] > last[:, None]
        noisy = torch.where(after, torch.randint(3, data.vocab_size, ids.shape), ids)
        torch.testing.assert_close(module.rewards(noisy, labels, pos), rewards, rtol=0, atol=1e-6)

        # negative control: a token before the read position does change the reward
        before = ids.clone()
        before[rows, last - 1] = (before[rows, last - 1] + 7) % data.vocab_size
        assert (module.rewards(before, labels, pos) - rewards).abs().min() > 1e-4

        # packed rows: one reward per document, equal to the unpacked one
        examples = [{"input_ids": ids[r, : last[r] + 1].tolist(), "labels": labels[r, : last[r] + 1].tolist()} for r in rows]
        bins = [[0, 1, 2], [3, 4, 5]]
        seq_len = max(sum(len(examples[i]["input_ids"]) for i in b) for b in bins) + 4
        packed = stack_rows([pack_examples(examples, b, seq_len, data.tokenizer.pad_id) for b in bins])
        packed_rewards = module.rewards(
            packed["input_ids"], packed["labels"], packed["position_ids"], packed["document_ids"]
        )
        torch.testing.assert_close(packed_rewards, rewards, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 7. zero targets


def test_zero_target_micro_batch_gives_zero_loss_and_zero_gradients(cache_dir: str) -> None:
    data = sft_data(cache_dir)
    module = SFTModule(preset="tiny", vocab_size=data.vocab_size)
    batch = data.collate([data.train_set[i] for i in range(4)])
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)  # e.g. everything truncated away
    with pytest.warns(NoTargetTokensWarning):
        loss, stats, tokens = module.compute_loss(batch)
    assert float(loss.detach()) == 0.0 and int(tokens) == 0
    loss.backward()
    grads = [p.grad for p in module.parameters()]
    assert all(g is not None for g in grads)  # backward ran through the model
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)
    assert torch.isfinite(stats["loss"]) and torch.isfinite(stats["token_acc"])


# --------------------------------------------------------------------------- 8. every stage learns


def fit_and_compare(module: L.LightningModule, data: L.LightningDataModule, steps: int) -> tuple[dict, dict]:
    """Full validation metrics before and after `steps` optimiser steps.

    Validation also runs inside `fit` (every 20 steps): a `validate` before `fit` once left
    the metrics' states as inference tensors that fit's validation could not update.
    """
    trainer = make_trainer(max_steps=steps, limit_val_batches=1.0, val_check_interval=20)
    before = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]
    return before, after


def test_pretrain_learns(cache_dir: str) -> None:
    data = PretrainData(cache_dir=cache_dir, seq_len=64, batch_size=16)
    module = PretrainModule(preset="tiny", vocab_size=data.vocab_size, lr=3e-3, warmup_steps=5)
    before, after = fit_and_compare(module, data, steps=40)
    assert after["val/loss"] < before["val/loss"] - 1.0
    assert after["val/token_acc"] > before["val/token_acc"] + 0.1
    torch.testing.assert_close(torch.tensor(after["val/ppl"]), torch.tensor(after["val/loss"]).exp())


def test_sft_learns_and_learns_to_stop(cache_dir: str) -> None:
    data = SFTData(cache_dir=cache_dir, seq_len=128, batch_size=8)
    module = SFTModule(
        preset="tiny", vocab_size=data.vocab_size, lr=3e-3, warmup_steps=5, generate_samples=4, max_new_tokens=12
    )
    before, after = fit_and_compare(module, data, steps=40)
    assert after["val/loss"] < before["val/loss"] - 1.0
    assert after["val/token_acc"] > before["val/token_acc"] + 0.1
    # the end-of-turn token is trained, so greedy replies end (TRL #1623 taught models never to stop)
    assert before["val/stop_rate"] == 0.0 and after["val/stop_rate"] >= 0.5


def test_reward_model_learns(cache_dir: str) -> None:
    data = PreferenceData(cache_dir=cache_dir, seq_len=128, batch_size=16)
    module = RewardModule(preset="tiny", vocab_size=data.vocab_size, lr=3e-3, warmup_steps=5)
    before, after = fit_and_compare(module, data, steps=60)
    assert after["val/loss"] < before["val/loss"] - 0.1
    assert after["val/accuracy"] > max(before["val/accuracy"], 0.65)


def test_dpo_learns(cache_dir: str) -> None:
    data = PreferenceData(cache_dir=cache_dir, seq_len=128, batch_size=16)
    module = DPOModule(preset="tiny", vocab_size=data.vocab_size, lr=3e-3, warmup_steps=5, beta=0.1)
    before, after = fit_and_compare(module, data, steps=60)
    assert before["val/rewards/accuracies"] == 0.0  # policy == reference: no reward gap anywhere
    assert abs(before["val/loss"] - math.log(2.0)) < 1e-6
    assert after["val/loss"] < before["val/loss"] - 0.1
    assert after["val/rewards/accuracies"] > 0.65
    assert after["val/rewards/margins"] > 0 and after["val/logps/rejected"] < before["val/logps/rejected"]


# --------------------------------------------------------------------------- 9. checkpoints


@pytest.mark.parametrize("explicit_config", [False, True], ids=["preset", "model-config"])
def test_checkpoint_rebuilds_the_model_and_init_from_loads_it(cache_dir: str, tmp_path: Path, explicit_config: bool) -> None:
    data = sft_data(cache_dir, batch_size=4)
    config = ModelConfig.from_name("tiny", vocab_size=data.vocab_size, n_layer=1)
    kwargs = {"model": config} if explicit_config else {"preset": "tiny", "vocab_size": data.vocab_size}
    module = SFTModule(lr=1e-2, generate_samples=0, **kwargs)
    initial = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    trainer = make_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(module, data)
    path = tmp_path / "sft.ckpt"
    trainer.save_checkpoint(path)
    assert any(not torch.equal(initial[k], v) for k, v in module.backbone.state_dict().items())  # it trained

    loaded = SFTModule.load_from_checkpoint(path)  # Lightning's default loading, nothing passed in
    assert loaded.config == module.config
    assert loaded.hparams.lr == 1e-2 and loaded.hparams.generate_samples == 0
    batch = data.collate([data.train_set[i] for i in range(4)])
    module.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(batch["input_ids"]), module.backbone(batch["input_ids"]), rtol=0, atol=0)

    # init_from: another stage starts from the SFT backbone (the DPO reference too); its own head stays fresh
    dpo = DPOModule(init_from=str(path), **kwargs)
    reward = RewardModule(init_from=str(path), **kwargs)
    dpo.setup("fit")
    reward.setup("fit")
    # the frozen reference stays out of checkpoints (a fresh module must load the state strictly)
    assert not any("reference" in key for key in dpo.state_dict())
    DPOModule(**kwargs).load_state_dict(dpo.state_dict())
    for name, value in module.backbone.state_dict().items():
        assert torch.equal(dpo.backbone.state_dict()[name], value), name
        assert torch.equal(dpo._reference.state_dict()[name], value), name
        assert torch.equal(reward.backbone.state_dict()[name], value), name
    with pytest.raises(ValueError, match="shape"):
        PretrainModule(init_from=str(path), model=module.config, vocab_size=module.config.vocab_size + 8).setup("fit")


def test_loaded_checkpoint_wins_over_init_from_and_dpo_reference_stays_initial(cache_dir: str, tmp_path: Path) -> None:
    """load_from_checkpoint then validate/fit must not reload `init_from` over the trained
    weights; a DPO module's reference is the init_from policy, not the trained one."""
    data = preference_data(cache_dir, batch_size=4)
    start = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0)
    start_path = tmp_path / "start.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in start.backbone.state_dict().items()}}, start_path)

    dpo = DPOModule(preset="tiny", vocab_size=data.vocab_size, init_from=str(start_path), lr=1e-2)
    trainer = make_trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(dpo, data)
    trained = tmp_path / "dpo.ckpt"
    trainer.save_checkpoint(trained)

    loaded = DPOModule.load_from_checkpoint(trained)
    loaded.setup("validate")  # what trainer.validate(loaded, data) does first
    for name, value in dpo.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[name], value), name  # trained weights kept
        assert torch.equal(loaded._reference.state_dict()[name], start.backbone.state_dict()[name]), name


def test_sequence_normalisation_validates_packed_rows(cache_dir: str) -> None:
    """Validation batches carry no step counts: the local count must be per document, as the
    loss counts them, or `normalize: sequence` with packing crashes on its first validation."""
    data = sft_data(cache_dir, packing="documents", batch_size=4)
    module = SFTModule(preset="tiny", vocab_size=data.vocab_size, normalize="sequence", generate_samples=0)
    batch = data.collate([data.val_set[i] for i in range(2)])
    loss, _, _ = module.compute_loss(batch)
    assert torch.isfinite(loss)


def test_reward_model_freezes_an_untied_output_layer(cache_dir: str) -> None:
    """The LM head gets no gradient in a reward model; left trainable, DDP fails waiting for it."""
    config = ModelConfig.from_name("tiny", tie_embeddings=False)
    module = RewardModule(model=config, vocab_size=preference_data(cache_dir).vocab_size)
    assert not module.backbone.lm_head.weight.requires_grad
    optimised = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert id(module.backbone.lm_head.weight) not in optimised


def test_grad_norm_is_logged_before_clipping(cache_dir: str) -> None:
    """train/grad_norm is the global gradient norm the optimiser step starts from, before gradient clipping."""

    class Capture(L.Callback):
        def __init__(self) -> None:
            self.pairs: list[tuple[float, float]] = []

        def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
            self.norm = float(torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]).norm())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.pairs.append((float(trainer.callback_metrics["train/grad_norm"]), self.norm))

    data = SFTData(cache_dir=cache_dir, batch_size=4, seq_len=64)
    module = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0)
    capture = Capture()
    L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1e-3, limit_val_batches=0, callbacks=[capture],
    ).fit(module, data)
    assert len(capture.pairs) == 2
    for logged, expected in capture.pairs:
        assert logged == pytest.approx(expected, rel=1e-5) and logged > 1e-3  # unclipped


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_clipping_by_the_logged_norm_trains_as_lightnings_clipping(cache_dir: str, precision: str) -> None:
    """The stage clips with the norm it measured for train/grad_norm; the weights after clipped steps are
    bit for bit those of Lightning's own clipping (`clip_grad_norm_`), which measures the norm again."""

    class LightningClipping(SFTModule):
        configure_gradient_clipping = L.LightningModule.configure_gradient_clipping

    weights = []
    for cls in (SFTModule, LightningClipping):
        data = SFTData(cache_dir=cache_dir, batch_size=4, seq_len=64, shuffle=False)
        torch.manual_seed(0)
        module = cls(preset="tiny", vocab_size=data.vocab_size, generate_samples=0, lr=1e-2, warmup_steps=0)
        L.Trainer(
            accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, gradient_clip_val=1e-2, limit_val_batches=0, precision=precision,
        ).fit(module, data)
        weights.append(module.backbone.state_dict())
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


def test_step_loss_is_the_same_for_any_batch_split(cache_dir: str) -> None:
    """train/step_loss averages the step's micro-batches by their token counts: 1 x 8 and 4 x 2 log the same value."""

    class Capture(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
                self.values.append(float(trainer.callback_metrics["train/step_loss"]))

    runs = []
    for batch_size, accumulate in ((8, 1), (2, 4)):
        data = SFTData(cache_dir=cache_dir, batch_size=batch_size, seq_len=128, packing="none", shuffle=False)
        torch.manual_seed(0)
        module = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0, lr=0.0)
        capture = Capture()
        L.Trainer(
            accelerator="cpu", max_steps=2, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[capture],
        ).fit(module, data)
        runs.append(capture.values)
    assert len(runs[0]) == 2
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)
