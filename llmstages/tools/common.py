"""What the model tools share: load a trained model, its tokenizer and its chat template.

Design choices:
- A source is an llmstages `.ckpt` (any stage) or a Hugging Face folder.
  The `.ckpt`'s backbone shape comes from its saved hyper-parameters exactly
  as the stage rebuilt it (`resolve_config`); its weights are the
  `backbone.*` entries. LoRA adapters in it (`*.lora_a`, `*.lora_b`) are
  merged with the `lora` hyper-parameters (rank, alpha) saved beside them.
  A reward model is recognised by its `value_head.weight` entry, never by a
  class name that a refactor could change.
- The tokenizer is, in order: the one given; the one the checkpoint's data
  module recorded (`datamodule_hyper_parameters.tokenizer`, when Lightning
  saved them); a Hugging Face source's own `tokenizer.json` (the folder
  itself, or the `.ckpt`'s `init_from` / `imported_from` folder); else the embedded default
  tokenizer, trained once in `cache_dir` as the data modules do. Its size
  must fit the model's embedding, or the wrong tokenizer is named; a pad
  token the tokenizer appended (a folder whose tokenizer has no pad, as
  Llama 3.x ships) may lie one past the last row: inference never embeds it
  (`padding_id` pads with a row the model has, under the mask).
- The chat template is the one given, else the recorded one, else `chatml`
  (the SFT data's default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmstages.model.config import ModelConfig
from llmstages.model.transformer import Transformer

DEFAULT_CACHE_DIR = ".cache/llmstages"
DEFAULT_TEMPLATE = "chatml"


@dataclass
class LoadedModel:
    """A ready model with what the tools need beside it."""

    model: Transformer
    value_head: Tensor | None = None  # [1, d_model] for a reward model
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    data_hyper_parameters: dict[str, Any] = field(default_factory=dict)
    source: Path = Path()
    lora_merged: bool = False

    @property
    def is_reward_model(self) -> bool:
        return self.value_head is not None


def checkpoint_config(hyper_parameters: dict[str, Any]) -> ModelConfig:
    """The backbone's `ModelConfig` as the stage that saved these hyper-parameters built it."""
    from llmstages.stages.base import resolve_config

    hp = hyper_parameters
    model = hp.get("model")
    if isinstance(model, dict):
        model = ModelConfig.from_dict(model)
    return resolve_config(model, hp.get("preset", "tiny"), hp.get("vocab_size"), hp.get("init_from"))


def _read_checkpoint(path: Path) -> dict[str, Any]:
    from llmstages.checkpointing import load_checkpoint_file

    checkpoint = load_checkpoint_file(path)  # a truncated or foreign file: an error naming it
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    if "hyper_parameters" not in checkpoint:
        raise ValueError(f"{path} has no 'hyper_parameters': the model's shape cannot be rebuilt")
    return checkpoint


def load_model(source: str | Path) -> LoadedModel:
    """A `.ckpt` or an HF folder as an eval-mode `Transformer` (LoRA merged) plus its value head."""
    from llmstages.model.lora import LoRAConfig, is_adapter_name, merge_lora_state_dict

    source = Path(source)
    if source.is_dir():
        from llmstages.model.hf import from_hf

        return LoadedModel(model=from_hf(source).eval(), source=source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such checkpoint file or Hugging Face folder")
    checkpoint = _read_checkpoint(source)
    hp = dict(checkpoint["hyper_parameters"])
    config = checkpoint_config(hp)
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    merged = any(is_adapter_name(k) for k in state)
    if merged:
        lora = hp.get("lora")
        if not isinstance(lora, dict):
            raise ValueError(
                f"{source} holds LoRA adapters but its hyper_parameters have no 'lora' settings "
                "(rank, alpha): they cannot be merged"
            )
        state = merge_lora_state_dict(state, LoRAConfig.from_dict(lora))
    model = Transformer(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: backbone weights do not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state)
    value_head = checkpoint["state_dict"].get("value_head.weight")
    return LoadedModel(
        model=model.eval(),
        value_head=None if value_head is None else value_head.detach().float(),
        hyper_parameters=hp,
        data_hyper_parameters=dict(checkpoint.get("datamodule_hyper_parameters") or {}),
        source=source,
        lora_merged=merged,
    )


def resolve_tokenizer(loaded: LoadedModel, tokenizer: str | None, cache_dir: str | Path = DEFAULT_CACHE_DIR):
    """The tokenizer for `loaded` (see the module docstring for the order); checks its size."""
    from llmstages.data.tokenizer import Tokenizer

    data_hp = loaded.data_hyper_parameters
    # the HF folder the weights came from: a stage's init_from, or what `llmstages import` read
    folders = [loaded.hyper_parameters.get(k) for k in ("init_from", "imported_from")]
    hf_folder = next((Path(f) for f in folders if f and (Path(f) / "tokenizer.json").is_file()), None)
    if tokenizer is not None:
        result, origin = Tokenizer.from_file(tokenizer), f"--tokenizer {tokenizer}"
    elif data_hp.get("tokenizer"):
        result, origin = Tokenizer.from_file(data_hp["tokenizer"]), f"the checkpoint's tokenizer {data_hp['tokenizer']}"
    elif loaded.source.is_dir():
        if not (loaded.source / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {loaded.source}; pass --tokenizer")
        result, origin = Tokenizer.from_file(loaded.source), f"{loaded.source}/tokenizer.json"
    elif hf_folder is not None:
        result, origin = Tokenizer.from_file(hf_folder), f"{hf_folder}/tokenizer.json"
    else:
        from llmstages.data.base import default_tokenizer

        cache = data_hp.get("cache_dir") or cache_dir
        result, origin = default_tokenizer(cache), "the embedded default tokenizer"
        if result.vocab_size != loaded.model.config.vocab_size:
            raise ValueError(
                f"{loaded.source}: the model has {loaded.model.config.vocab_size} embedding rows but "
                f"{origin} has {result.vocab_size} tokens; pass the run's tokenizer with --tokenizer"
            )
    rows = loaded.model.config.vocab_size
    # a pad token the tokenizer appended (a folder without one, e.g. Llama 3.x) needs no row: padding is masked
    beyond = result.vocab_size - rows - (1 if result.pad_id >= rows else 0)
    if beyond > 0:
        raise ValueError(
            f"{origin} has {result.vocab_size} tokens, more than the model's "
            f"{rows} embedding rows: not this model's tokenizer"
        )
    return result


def model_template(loaded: LoadedModel, template: str | None, tokenizer):
    """The chat template: the one given, else the run's recorded one, else chatml; auto/hf: the tokenizer's own."""
    from llmstages.data.templates import resolve_template

    name = template or loaded.data_hyper_parameters.get("template") or DEFAULT_TEMPLATE
    return resolve_template(name, tokenizer)


def read_prompts(path: str | Path) -> list[list[dict[str, str]] | str]:
    """Prompts from a file: `.jsonl` rows with `messages` (or `prompt`), else one plain prompt per line."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts: list[list[dict[str, str]] | str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if isinstance(row, dict) and isinstance(row.get("messages"), list):
                prompts.append(row["messages"])
            elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
                prompts.append(row["prompt"])
            else:
                raise ValueError(f"{path}:{number}: expected an object with 'messages' (a list) or 'prompt' (a str)")
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts


def as_messages(prompt: list[dict[str, str]] | str) -> list[dict[str, str]]:
    """A conversation ending before the assistant's reply (a plain string is one user message)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    while messages and messages[-1].get("role") == "assistant":
        messages.pop()  # a reference reply at the end is what we are asked to generate
    if not messages:
        raise ValueError("a prompt needs at least one message before the reply")
    return messages


def padding_id(tokenizer, model) -> int:
    """An id to fill a batch's padding with: the tokenizer's pad, or its end of text when the model has no pad row.

    Padding is masked, so any id the embedding has works; a model folder without a pad token (Llama 3.x)
    has one row fewer than the tokenizer that got `<|pad|>` appended.
    """
    return tokenizer.pad_id if tokenizer.pad_id < model.config.vocab_size else tokenizer.eos_id
