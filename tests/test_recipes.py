"""configs/recipes/ on CPU: a random model of each real shape (reduced width, the shape's own config.json
layout, its chat template) starts SFT, reward-model and DPO runs, full and LoRA, for 2 steps each."""

from pathlib import Path

import pytest
import torch
import yaml

from llmstages.data.chat import ChatTemplate
from llmstages.data.tokenizer import Tokenizer
from llmstages.trainer_cli import lightning_cli

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# the shapes' own config.json fields, narrowed (heads and kv heads keep their ratio) and shortened
SHAPES = {
    "qwen2.5-0.5b": ("Qwen2Config", "Qwen2ForCausalLM", "chatml", dict(
        hidden_size=56, num_attention_heads=14, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=512,
    )),
    "llama3.2-1b": ("LlamaConfig", "LlamaForCausalLM", "llama3", dict(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
        rope_theta=500_000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=512,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )),
}


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, cache: Path):
    """shape -> a Hugging Face folder as a download has it: config.json, safetensors, tokenizer and chat template."""
    made: dict[str, Path] = {}

    def folder_of(name: str) -> Path:
        if name not in made:
            config_class, model_class, template, fields = SHAPES[name]
            folder = tmp_path_factory.mktemp(name)
            tokenizer = Tokenizer.from_file(cache / "default-tokenizer-1024")
            tokenizer.chat_template = ChatTemplate.get(template).jinja
            tokenizer.save(folder)
            config = getattr(transformers, config_class)(vocab_size=tokenizer.vocab_size, **fields)
            torch.manual_seed(0)
            getattr(transformers, model_class)(config).save_pretrained(folder)
            made[name] = folder
        return made[name]

    return folder_of


def _fit(stage: str, recipe: str, folder: Path, tmp_path: Path, cache: Path, lora: bool):
    override = {
        "trainer": {"max_steps": 2, "accumulate_grad_batches": 1, "limit_val_batches": 0, "val_check_interval": 100,
                    "enable_progress_bar": False, "accelerator": "cpu", "devices": 1,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}},
        "model": {"init_args": {"init_from": str(folder)}},
        "data": {"init_args": {"cache_dir": str(cache), "batch_size": 2, "seq_len": 128}},
    }
    if stage == "sft":
        override["model"]["init_args"]["generate_samples"] = 0
    fragment = tmp_path / f"{stage}-test.yaml"
    fragment.write_text(yaml.safe_dump(override))
    configs = [CONFIGS / f"{stage}.yaml", CONFIGS / "recipes" / f"{recipe}.yaml"]
    if lora:
        configs.append(CONFIGS / "recipes" / "lora.yaml")
    args = ["fit", *(a for c in configs for a in ("--config", str(c))), "--config", str(fragment),
            "--trainer.default_root_dir", str(tmp_path / "runs")]
    return lightning_cli(args)


# every stage, full and LoRA, on the Qwen2.5 shape; SFT and DPO with LoRA on the Llama-3.2 shape too
CASES = [("qwen2.5-0.5b", stage, lora) for stage in ("sft", "reward", "dpo") for lora in (False, True)]
CASES += [("llama3.2-1b", "sft", True), ("llama3.2-1b", "dpo", True)]


@pytest.mark.parametrize("shape,stage,lora", CASES, ids=[f"{s}-{st}-{'lora' if lo else 'full'}" for s, st, lo in CASES])
def test_recipe_runs_two_steps(model_folders, shape: str, stage: str, lora: bool, tmp_path: Path, cache: Path) -> None:
    name, folder = shape, model_folders(shape)
    cli = _fit(stage, name, folder, tmp_path, cache, lora)
    assert cli.trainer.global_step == 2
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.datamodule.template.name == "auto"  # the folder's own Jinja template drives the loss mask
    assert cli.datamodule.tokenizer.vocab_size == cli.model.config.vocab_size
    assert cli.model.backbone.activation_checkpointing
    trainable = [n for n, p in cli.model.named_parameters() if p.requires_grad]
    if lora:
        assert trainable and all(".lora_" in n or n.startswith("value_head") for n in trainable)
    else:
        assert any(n.endswith("q_proj.weight") for n in trainable)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["train/grad_norm"])
