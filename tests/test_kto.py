"""KTO: the loss and its reference point z0, the data (records, unpaired pairs, mismatched KL rows),
the step-level z0's split invariance (TRL's per-micro-batch z0 as the negative control), and TRL 1.16.

References are written out here in float64; TRL's own `KTOTrainer._compute_loss` is run on the same
log-probs where it is installed (a stand-in model hands it those log-probs; no network, no weights).
"""

import json
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from helpers import sharpen
from llmstages.data import KTOData
from llmstages.data.formats import DataFormatError, read_kto
from llmstages.data.kto import KLStepLoader
from llmstages.losses import kto_loss, kto_reference_point
from llmstages.stages import KTOModule
from llmstages.stages.kto import check_class_weights

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec"),
]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --------------------------------------------------------------------------- the loss


def test_kto_loss_matches_the_formula_for_both_classes_and_weights():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(10, generator=g, dtype=torch.float64) * 20
    ref = logps + torch.randn(10, generator=g, dtype=torch.float64)
    desirable = torch.tensor([True, False] * 5)
    losses, rewards = kto_loss(logps, ref, desirable, 0.3, beta=0.2, desirable_weight=1.5, undesirable_weight=0.7)
    for i in range(10):
        r = float(logps[i] - ref[i])
        expected = 1.5 * (1 - sigmoid(0.2 * (r - 0.3))) if i % 2 == 0 else 0.7 * (1 - sigmoid(0.2 * (0.3 - r)))
        assert float(losses[i]) == pytest.approx(expected, rel=1e-12)
        assert float(rewards[i]) == pytest.approx(0.2 * r, rel=1e-12)


def test_reference_point_is_the_clamped_detached_mean_and_never_nan():
    ratios = torch.tensor([1.0, 3.0, -1.0], requires_grad=True)
    z0 = kto_reference_point(ratios)
    assert float(z0) == pytest.approx(1.0) and not z0.requires_grad
    assert float(kto_reference_point(torch.tensor([-2.0, -1.0]))) == 0.0  # clamped at 0
    empty = kto_reference_point(torch.zeros(0))
    assert float(empty) == 0.0 and not math.isnan(float(empty))  # no mismatched pair (TRL PR #1380)


def test_the_class_weight_warning_follows_trls_range():
    """TRL warns when neither weight puts w_D n_D / (w_U n_U) in [1, 4/3] (bounds rounded to 2 decimals)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_class_weights(100, 100, 1.0, 1.0)  # equal counts: never
        check_class_weights(948, 952, 1.0, 1.0)  # desirable_weight 1.0 lies in [round(952/948, 2), ...] = [1.0, 1.34]
        check_class_weights(100, 50, 1.0, 1.6)  # desirable_weight 1.0 in [50 * 1.6 / 100, that * 1.33] = [0.8, 1.06]
    with pytest.warns(UserWarning, match=r"desirable_weight in \[0.25, 0.33\] OR undesirable_weight in \[1.5, 2.0\]"):
        check_class_weights(100, 50, 1.0, 0.5)
    with pytest.warns(UserWarning, match="outside"):
        check_class_weights(50, 100, 1.0, 1.0)  # ratio 0.5: desirable_weight should be in [2.0, 2.66]


def test_kto_loss_equals_trls_compute_loss_in_value_and_gradient():
    kto = pytest.importorskip("trl.trainer.kto_trainer")
    g = torch.Generator().manual_seed(3)
    n, width = 6, 5
    logps = (-torch.rand(n, generator=g, dtype=torch.float64) * 10).requires_grad_(True)
    ref = (logps.detach() + torch.randn(n, generator=g, dtype=torch.float64))
    kl, ref_kl = -torch.rand(n, generator=g, dtype=torch.float64) * 10, -torch.rand(n, generator=g, dtype=torch.float64) * 10
    kl = ref_kl + 0.5 + torch.randn(n, generator=g, dtype=torch.float64) * 0.3  # a positive mean log-ratio: z0 > 0
    labels = [True, False, False, True, True, False]
    main_ids, kl_ids = torch.ones(n, width, dtype=torch.long), torch.full((n, width), 2, dtype=torch.long)

    def model(input_ids, **_):  # hands TRL the summed log-probs in the first scored position
        values = kl if torch.equal(input_ids, kl_ids) else logps
        log_probs = torch.cat([values[:, None], torch.zeros(n, width - 2, dtype=values.dtype)], 1)
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(n, width - 1), mean_logits=torch.zeros(n, width - 1))

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t)
    fake = SimpleNamespace(
        accelerator=accelerator, model=SimpleNamespace(training=True), aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=True, loss_type="kto", beta=0.1, desirable_weight=1.3, undesirable_weight=0.8,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    fake._compute_kl_logps = lambda m, b: kto.KTOTrainer._compute_kl_logps(fake, m, b)
    ones = torch.ones(n, width, dtype=torch.long)
    batch = {"input_ids": main_ids, "attention_mask": ones, "completion_mask": ones, "label": torch.tensor(labels),
             "KL_input_ids": kl_ids, "KL_attention_mask": ones, "KL_completion_mask": ones,
             "ref_logps": ref, "ref_KL_logps": ref_kl}
    trl = kto.KTOTrainer._compute_loss(fake, model, batch, False)
    trl.backward()
    trl_grad = logps.grad.clone()
    logps.grad = None
    z0 = kto_reference_point(kl - ref_kl)
    assert float(z0) == pytest.approx(fake._metrics["train"]["kl"][0], rel=1e-12) and float(z0) > 0
    losses, _ = kto_loss(logps, ref, torch.tensor(labels), z0, beta=0.1, desirable_weight=1.3, undesirable_weight=0.8)
    # TRL concatenates the desirable losses before the undesirable ones; the mean is the same
    losses.mean().backward()
    assert float(losses.mean().detach()) == pytest.approx(float(trl.detach()), rel=1e-12)
    torch.testing.assert_close(logps.grad, trl_grad, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- the data


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_read_kto_takes_labelled_records_and_unpairs_preference_pairs(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": [{"role": "user", "content": "3+3?"}], "completion": [{"role": "assistant", "content": "7"}],
         "label": False},
        {"prompt": "1+1?", "chosen": "2", "rejected": "3"},
    ])
    examples, report = read_kto(path)
    assert [(e["prompt"][-1]["content"], e["completion"][0]["content"], e["label"]) for e in examples] == [
        ("2+2?", "4", True), ("3+3?", "7", False), ("1+1?", "2", True), ("1+1?", "3", False)]
    assert report.kept == 3


@pytest.mark.parametrize("record,field", [({"prompt": "a", "completion": "b"}, "label"),
                                          ({"prompt": "a", "completion": "b", "label": "yes"}, "label"),
                                          ({"completion": "b", "label": True}, "prompt")])
def test_a_bad_kto_record_names_file_line_and_field(tmp_path, record, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "y", "label": True}, record])
    with pytest.raises(DataFormatError) as error:
        read_kto(path)
    message = str(error.value)
    assert "bad.jsonl" in message and "2" in message and field in message


def test_every_kl_row_pairs_a_prompt_with_another_prompts_completion(cache_dir):
    data = KTOData(cache_dir=cache_dir, batch_size=4, seq_len=128, shuffle=False)
    data.setup("fit")
    items = [data.train_set[i] for i in range(40)]
    assert all(item["kl"] is not None for item in items)
    for item in items:
        row, kl = item["row"], item["kl"]
        prompt_len = row["labels"].index(next(v for v in row["labels"] if v != -100))
        kl_prompt_len = kl["labels"].index(next(v for v in kl["labels"] if v != -100))
        assert kl["input_ids"][:kl_prompt_len] == row["input_ids"][:prompt_len]  # its own prompt
        assert kl["input_ids"][kl_prompt_len:] != row["input_ids"][prompt_len:]  # another completion
    # unpaired preference data: the neighbouring example answers the same prompt, and is skipped
    assert items[1]["kl"]["input_ids"] != items[0]["row"]["input_ids"]
    for size in (1, 3):  # odd micro-batches, and one of a single example, keep every mismatched pair (TRL #1911)
        assert bool(data.collate(items[:size])["kl_valid"].all())


def test_data_with_a_single_prompt_has_no_mismatched_pair_and_z0_is_zero_not_nan(tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "2+2?", "completion": c, "label": c == "4"} for c in "4567"])
    data = KTOData(files=[path], cache_dir=cache_dir, batch_size=4, seq_len=64, val_fraction=0.0)
    data.setup("fit")
    batch = data.collate([data.train_set[i] for i in range(4)])
    assert not bool(batch["kl_valid"].any())
    module = KTOModule(preset="tiny", vocab_size=data.vocab_size)
    module.setup("fit")
    sharpen(module.backbone)
    for mode in ("step", "micro_batch"):
        module.hparams.kl_reference = mode
        loss, stats, _ = module.compute_loss(batch)
        assert float(stats["kl"]) == 0.0 and math.isfinite(float(loss.detach()))


# --------------------------------------------------------------------------- the step


def kto_setup(cache_dir, kl_reference):
    data = KTOData(cache_dir=cache_dir, batch_size=8, seq_len=96, shuffle=False)
    data.setup("fit")
    module = KTOModule(preset="tiny", vocab_size=data.vocab_size, kl_reference=kl_reference, beta=0.5).double()
    sharpen(module.backbone, std=0.2, seed=7)
    module.setup("fit")  # the reference copies these sharp weights: mismatched completions are unlikely under it
    # a flatter policy gives them more probability than the reference: z0 > 0, different per micro-batch
    sharpen(module.backbone, std=0.05, seed=8)
    module.backbone.double()
    module.frozen_reference.copy.double()
    module.train()
    return data, module


def step_grads(data, module, splits):
    """Gradients and train/step_loss of one step whose examples 0..7 are split into micro-batches `splits`."""
    module.zero_grad()
    batches = [data.collate([data.train_set[i] for i in rows]) for rows in splits]
    annotated = list(KLStepLoader(batches, len(batches), data._count))
    module.on_step_start(annotated[0])
    weighted, examples, z0s = 0.0, 0, []
    for batch in annotated:
        loss, stats, weight = module.compute_loss(batch)
        loss.backward()
        weighted, examples = weighted + float(stats["loss"]) * weight, examples + weight
        z0s.append(float(stats["kl"]))
    return {n: p.grad.clone() for n, p in module.named_parameters()}, weighted / examples, z0s


def test_step_level_z0_makes_the_step_independent_of_its_split(cache_dir):
    data, module = kto_setup(cache_dir, "step")
    whole, whole_loss, (z0,) = step_grads(data, module, [range(8)])
    assert z0 > 0
    for splits in ([range(3), range(3, 8)], [range(2), range(2, 4), range(4, 8)]):
        grads, step_loss, z0s = step_grads(data, module, splits)
        assert z0s == pytest.approx([z0] * len(splits), rel=1e-12)
        assert step_loss == pytest.approx(whole_loss, rel=1e-10)
        for name in whole:
            torch.testing.assert_close(grads[name], whole[name], rtol=1e-9, atol=1e-12)


def test_trls_micro_batch_z0_depends_on_the_split(cache_dir):
    """The negative control: TRL's z0 per micro-batch changes the step's gradient when the step is split."""
    data, module = kto_setup(cache_dir, "micro_batch")
    whole, _, (z0,) = step_grads(data, module, [range(8)])
    grads, _, z0s = step_grads(data, module, [range(3), range(3, 8)])
    assert z0s[0] != pytest.approx(z0s[1]) and max(z0s) > 0
    assert not all(torch.allclose(grads[n], whole[n], rtol=1e-6, atol=1e-9) for n in whole)
    module.hparams.kl_reference = "step"
    step_whole, _, (step_z0,) = step_grads(data, module, [range(8)])
    assert step_z0 == pytest.approx(z0, rel=1e-12)  # one micro-batch: the two scopes agree
    for name in whole:
        torch.testing.assert_close(step_whole[name], whole[name])


def test_at_initialisation_z0_and_rewards_are_zero_and_the_loss_is_a_half(cache_dir):
    data = KTOData(cache_dir=cache_dir, batch_size=8, seq_len=96, shuffle=False)
    data.setup("fit")
    module = KTOModule(preset="tiny", vocab_size=data.vocab_size, desirable_weight=2.0, undesirable_weight=1.0)
    module.setup("fit")
    batch = data.collate([data.train_set[i] for i in range(8)])
    loss, stats, _ = module.compute_loss(batch)
    desirable = int(batch["label"].sum())
    assert float(loss.detach()) == pytest.approx((2.0 * desirable + (8 - desirable)) * 0.5 / 8, rel=1e-6)
    assert float(stats["kl"]) == 0.0 and float(stats["rewards/chosen"].value) == 0.0
    assert float(stats["count/desirable"]) == desirable and float(stats["count/undesirable"]) == 8 - desirable


def test_a_shuffled_accumulated_run_trains_and_logs_trls_names(cache_dir):
    data = KTOData(cache_dir=cache_dir, batch_size=3, seq_len=96, shuffle=True)
    module = KTOModule(preset="tiny", vocab_size=data.vocab_size)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2, max_steps=2,
                        accumulate_grad_batches=2, val_check_interval=2)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    for name in ("train/kl", "train/rewards/chosen", "train/logps/rejected", "train/count/desirable",
                 "train/step_loss", "val/kl", "val/loss"):
        assert name in metrics and math.isfinite(float(metrics[name])), name
