"""The shape the stages share: one set of steps, one frozen reference, one model loader, one exact match."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
import torch

from llmstages.data.answers import exact_match
from llmstages.model import LoRAConfig, ModelConfig, Transformer
from llmstages.model.checkpoint import load_model
from llmstages.model.lora import apply_lora
from llmstages.stages import DPOModule, GRPOModule, PretrainModule, RewardModule, SFTModule, StageModule
from llmstages.stages.reference import FrozenReference

PACKAGE = Path(__file__).resolve().parents[1] / "llmstages"
STAGES = [PretrainModule, SFTModule, RewardModule, DPOModule, GRPOModule]


@pytest.mark.parametrize("stage", STAGES, ids=lambda c: c.__name__)
def test_no_stage_overrides_the_shared_steps(stage):
    for cls in stage.__mro__:
        if cls is StageModule:
            break
        for step in ("training_step", "validation_step", "on_train_batch_start", "on_before_optimizer_step"):
            assert step not in vars(cls), f"{cls.__name__} overrides {step}; fill a StageModule seam instead"


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


@pytest.mark.parametrize("folder", ["model", "tools", "stages/grpo/rewards.py"])
def test_model_tools_and_rewards_never_import_a_stage(folder):
    target = PACKAGE / folder
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    for path in files:
        stages = {m for m in imported_modules(path) if m.startswith("llmstages.stages")}
        assert not stages, f"{path.relative_to(PACKAGE)} imports {sorted(stages)}"


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_name("tiny"))


def test_frozen_copy_keeps_the_initial_policy_outside_gradients():
    policy = tiny()
    ids = torch.randint(0, policy.config.vocab_size, (2, 9))
    before = policy(ids).detach()
    reference = FrozenReference(adapters_off=False)
    reference.build(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1)
    with reference.model(policy) as ref:
        assert ref is not policy and not any(p.requires_grad for p in ref.parameters()) and not ref.training
        torch.testing.assert_close(ref(ids), before)
    reference.free()
    assert not reference.available()


def test_adapters_off_reference_is_the_base_model_without_a_copy():
    policy = tiny()
    ids = torch.randint(0, policy.config.vocab_size, (2, 9))
    base = policy(ids).detach()
    apply_lora(policy, LoRAConfig(rank=2, targets=["q", "v"]))
    with torch.no_grad():  # trained adapters change the policy's output
        for name, p in policy.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.5)
    assert not torch.allclose(policy(ids), base)
    reference = FrozenReference(adapters_off=True)
    reference.build(policy)
    assert reference.copy is None and reference.available()
    with torch.no_grad(), reference.model(policy) as ref:
        assert ref is policy
        torch.testing.assert_close(ref(ids), base)
    assert not torch.allclose(policy(ids), base)  # adapters back on after the block


def test_reference_rebuilt_on_load_and_outside_the_state_dict(tmp_path):
    dpo = DPOModule(preset="tiny", vocab_size=64)
    dpo.setup("fit")
    assert dpo._reference is not None
    path = tmp_path / "dpo.ckpt"
    torch.save({"state_dict": dpo.state_dict(), "hyper_parameters": dict(dpo.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    assert not any(k.startswith("_reference") or "frozen" in k for k in dpo.state_dict())
    loaded = DPOModule.load_from_checkpoint(path)
    assert loaded._reference is not None and loaded._reference is not dpo._reference


def test_one_loader_reads_a_reward_model_like_the_stage(tmp_path):
    rm = RewardModule(preset="tiny", vocab_size=64)
    path = tmp_path / "rm.ckpt"
    torch.save({"state_dict": rm.state_dict(), "hyper_parameters": dict(rm.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    loaded = load_model(path)
    assert loaded.is_reward_model
    ids = torch.randint(0, 64, (2, 7))
    labels = torch.full_like(ids, -100)
    labels[0, 3:6], labels[1, 2:7] = ids[0, 3:6], ids[1, 2:7]
    with torch.no_grad():
        torch.testing.assert_close(loaded.rewards(ids, labels), rm.rewards(ids, labels))


def test_exact_match_needs_a_stop_and_ignores_surrounding_whitespace():
    assert exact_match(" 47\n", "47") and exact_match("47", " 47 ", stopped=True)
    assert not exact_match("47", "47", stopped=False)
    assert not exact_match("4 7", "47") and not exact_match("cat", "CAT")
