"""Stage options that must not change what is trained: LoRA's adapters-disabled DPO reference, activation
checkpointing; and what LoRA does change: only adapters train, and init_from merges a LoRA run's adapters."""

import math

import lightning as L
import pytest
import torch

from llmstages.data import PreferenceData, SFTData
from llmstages.model.lora import LoRAConfig, merge_lora
from llmstages.stages import DPOModule, SFTModule

LORA = {"rank": 4, "alpha": 8.0, "targets": ["q", "v", "up"]}


def _perturb_adapters(module) -> None:
    with torch.no_grad():
        for name, p in module.backbone.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(std=0.05)


def test_dpo_lora_reference_is_the_base_model_without_a_copy(cache_dir: str) -> None:
    """With LoRA the reference is the policy with adapters disabled; it equals a frozen copy of the base."""
    data = PreferenceData(cache_dir=cache_dir, batch_size=8, seq_len=128)
    data.setup()
    batch = data.collate([data.train_set[i] for i in range(8)])
    lora = DPOModule(preset="tiny", vocab_size=data.vocab_size, lora=LORA)
    lora.setup("fit")
    assert lora._reference is None  # no second copy of the model
    loss, _, _ = lora.compute_loss(batch)
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)), rtol=0, atol=1e-6)  # B = 0: policy == reference

    _perturb_adapters(lora)
    loss_lora, stats_lora, _ = lora.compute_loss(batch)
    # the same policy as plain weights, against a frozen copy of the base: the classic DPO set-up
    plain = DPOModule(preset="tiny", vocab_size=data.vocab_size)
    base = {k: v for k, v in lora.backbone.state_dict().items() if "lora" not in k}
    plain.backbone.load_state_dict(base)
    plain.setup("fit")  # reference = copy of the base weights
    plain.backbone.load_state_dict(merge_lora(lora.backbone).state_dict())  # policy = merged LoRA weights
    loss_plain, stats_plain, _ = plain.compute_loss(batch)
    assert abs(float(loss_plain.detach()) - math.log(2.0)) > 1e-4  # the comparison is not trivial
    torch.testing.assert_close(loss_lora, loss_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_lora["rewards/margins"], stats_plain["rewards/margins"], rtol=1e-4, atol=1e-6)


def test_lora_trains_only_adapters_and_records_its_config(cache_dir: str, tmp_path) -> None:
    data = SFTData(cache_dir=cache_dir, batch_size=4, seq_len=64)
    module = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0, lora=LORA, lr=1e-2)
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, data)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    names = {n for n, p in module.named_parameters() if id(p) in optimised}
    assert names and all(".lora_" in n for n in names)
    after = module.backbone.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value) == ("lora_b" not in name and "lora_a" not in name), name
    assert module.hparams["lora"] == LoRAConfig(**LORA).to_dict()
    trainer.save_checkpoint(tmp_path / "lora.ckpt")

    # a later stage chains from it with the adapters merged into its base weights
    chained = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0, init_from=str(tmp_path / "lora.ckpt"))
    chained.setup("fit")
    ids = torch.randint(0, data.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(chained.backbone(ids), module.backbone(ids), rtol=1e-5, atol=1e-5)


def test_lora_with_unknown_targets_is_refused() -> None:
    with pytest.raises(ValueError, match="lora.targets"):
        SFTModule(preset="tiny", vocab_size=512, lora={"rank": 4, "targets": ["qkv"]})


def test_activation_checkpointing_gives_the_same_loss_and_gradients(cache_dir: str) -> None:
    data = SFTData(cache_dir=cache_dir, batch_size=4, seq_len=128)
    data.setup()
    batch = data.collate([data.train_set[i] for i in range(4)])
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        module = SFTModule(preset="tiny", vocab_size=data.vocab_size, generate_samples=0, activation_checkpointing=flag)
        module.train()
        loss, _, _ = module.compute_loss(batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)
