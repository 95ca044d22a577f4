"""Native LoRA: starts equal to the base, trains only adapters, merges and disables exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llmstages.model import ModelConfig, Transformer
from llmstages.model.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    base_state_dict,
    lora_disabled,
    lora_state_dict,
    merge_lora,
    merge_lora_state_dict,
    trainable_parameters,
)

ALL = ["q", "k", "v", "o", "gate", "up", "down"]


def _base(**overrides) -> Transformer:
    return Transformer(ModelConfig.from_name("tiny", qkv_bias=True, **overrides)).eval()


def _trained_adapters(model: Transformer) -> Transformer:
    """Adapters away from their zero start, as after some training."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 13))


@torch.no_grad()
def test_fresh_adapters_leave_outputs_unchanged_and_names_kept():
    base = _base()
    ids = _ids()
    before = base(ids)
    names = set(base.state_dict())
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8, targets=ALL))
    assert torch.equal(model(ids), before)  # B = 0
    state = model.state_dict()
    adapters = set(lora_state_dict(model))
    assert names <= set(state) and set(state) - names == adapters
    assert set(base_state_dict(model)) == names  # what a base checkpoint (init_from) must provide
    model.load_state_dict(base.state_dict(), strict=False)  # loading base weights leaves the adapters alone
    assert "blocks.0.attn.q_proj.lora_a" in adapters and "blocks.1.mlp.down_proj.lora_b" in adapters
    assert len(adapters) == 2 * 7 * model.config.n_layer
    assert state["blocks.0.attn.q_proj.lora_a"].shape == (4, 64)
    assert state["blocks.0.attn.q_proj.lora_b"].shape == (64, 4)


def test_only_adapters_train_and_gradients_reach_them():
    model = apply_lora(_base().train(), LoRAConfig(rank=4, targets=["q", "v", "down"]))
    trainable = dict(trainable_parameters(model))
    assert trainable and all(name.endswith(("lora_a", "lora_b")) for name in trainable)
    assert set(trainable) == set(lora_state_dict(model))
    assert not any("k_proj" in n or "embed" in n or "norm" in n for n in trainable)
    ids = _ids()
    loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    # B starts at zero, so A gets no gradient on the first step; B does, everywhere
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if n.endswith("lora_b"))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    # after one optimiser step both factors move and the output changes
    optimiser = torch.optim.SGD(trainable.values(), lr=0.5)
    optimiser.step()
    optimiser.zero_grad()
    loss2 = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss2.backward()
    assert all(p.grad.abs().sum() > 0 for p in trainable.values())


@torch.no_grad()
def test_merge_equals_unmerged_forward_and_restores_plain_layers():
    base = _base()
    model = _trained_adapters(apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=16, targets=ALL)))
    ids = _ids()
    adapted = model(ids)
    assert not torch.allclose(adapted, base(ids), atol=1e-4)
    saved = {name: t.clone() for name, t in model.state_dict().items()}  # merge_lora works in place
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(merged(ids), adapted, atol=1e-5, rtol=1e-5)
    # the same fold on a saved state dict (export from a checkpoint)
    folded = merge_lora_state_dict(saved, LoRAConfig(rank=4, alpha=16, targets=ALL))
    fresh = Transformer(base.config).eval()
    fresh.load_state_dict(folded)
    torch.testing.assert_close(fresh(ids), adapted, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_disabled_adapters_equal_the_base_model():
    base = _base()
    model = _trained_adapters(apply_lora(copy.deepcopy(base), LoRAConfig(rank=2, targets=ALL, dropout=0.1)))
    ids = _ids()
    adapted = model(ids)
    with lora_disabled(model) as reference:
        assert reference is model
        torch.testing.assert_close(model(ids), base(ids), atol=0, rtol=0)
    torch.testing.assert_close(model(ids), adapted)  # back on after the block


def test_disabled_reference_equals_a_frozen_copy_in_a_dpo_style_step():
    """The DPO reference as `lora_disabled(policy)` gives the log-probs a frozen copy of the start gives."""
    from llmstages.losses import token_logps_from_logits as token_logps

    base = _base()
    frozen = copy.deepcopy(base).requires_grad_(False)
    policy = _trained_adapters(apply_lora(base.train(), LoRAConfig(rank=4, targets=ALL)))
    ids = _ids()
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad(), lora_disabled(policy):
        ours = token_logps(policy(ids), labels)
    with torch.no_grad():
        copied = token_logps(frozen(ids), labels)
    torch.testing.assert_close(ours, copied, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"targets": ["qkv"]}, r"lora.targets \['qkv'\] match no layer \('qkv' unknown\)"),
        ({"targets": []}, "lora.targets"),
        ({"rank": 0}, "lora.rank"),
        ({"alpha": 0}, "lora.alpha"),
        ({"dropout": 1.0}, "lora.dropout"),
    ],
)
def test_bad_lora_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def test_apply_twice_and_unknown_fields_are_errors():
    model = apply_lora(_base(), LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="unknown fields"):
        LoRAConfig.from_dict({"rank": 4, "r": 4})
    assert LoRAConfig.from_dict(LoRAConfig(rank=3, targets=["up"]).to_dict()) == LoRAConfig(rank=3, targets=["up"])


def test_lora_on_the_meta_device_allocates_nothing():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name("1b"))
    apply_lora(model, LoRAConfig(rank=16, targets=ALL))
    assert all(p.device.type == "meta" for p in model.parameters())
    trainable = sum(p.numel() for _, p in trainable_parameters(model))
    cfg = model.config
    kv = cfg.n_kv_head * cfg.head_dim
    per_layer = 16 * ((cfg.d_model + cfg.d_model) + 2 * (cfg.d_model + kv) + (cfg.d_model + cfg.d_model)
                      + 2 * (cfg.d_model + cfg.d_mlp) + (cfg.d_mlp + cfg.d_model))
    assert trainable == cfg.n_layer * per_layer


_FSDP_WORKER = r'''
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from llmstages.model import ModelConfig, Transformer
from llmstages.model.lora import LoRAConfig, apply_lora, lora_disabled


def build():
    torch.manual_seed(0)
    model = apply_lora(Transformer(ModelConfig.from_name("tiny")), LoRAConfig(rank=4, targets=["q", "v", "up", "down"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.05)
    ids = torch.randint(0, 512, (4, 16))
    return model, ids


def loss_of(model, ids):
    return F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model, ids = build()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    mine = ids.chunk(world)[rank]
    loss_of(model, mine).backward()  # FSDP2 averages gradients over ranks
    with torch.no_grad(), lora_disabled(model):
        base_loss = loss_of(model, mine)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, base_loss)
    if rank == 0:
        torch.save({"grads": grads, "frozen_grads": frozen_grads, "base_loss": torch.stack(losses).mean()}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    init_file, out = sys.argv[1], sys.argv[2]
    mp.spawn(worker, args=(2, init_file, out), nprocs=2)
'''


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_under_fsdp2_matches_one_process(tmp_path):
    """Adapters sharded with their frozen base by FSDP2 (2 gloo ranks): same adapter gradients, base untouched."""
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(_FSDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "init"), str(tmp_path / "out.pt")],
                            capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = torch.load(tmp_path / "out.pt", weights_only=False)

    import importlib.util

    spec = importlib.util.spec_from_file_location("lora_fsdp_worker", script)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)  # the same model and batch, in one process
    model, ids = worker.build()
    worker.loss_of(model, ids).backward()
    with torch.no_grad(), lora_disabled(model):
        base_loss = worker.loss_of(model, ids)
    assert sharded["frozen_grads"] == []
    assert sharded["grads"].keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(sharded["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(sharded["base_loss"], base_loss, rtol=1e-5, atol=1e-6)
