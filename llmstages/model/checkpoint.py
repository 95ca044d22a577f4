"""Trained models from files: the one place a `.ckpt` or a Hugging Face folder becomes a backbone.

Design choices:
- A source is an llmstages `.ckpt` (any stage) or a Hugging Face folder. Every reader of
  trained weights goes through here: a stage's `init_from` (`load_backbone_weights`), the
  tools and a GRPO reward model (`load_model`).
- A `.ckpt`'s backbone shape comes from its saved hyper-parameters exactly as the stage built
  it (`checkpoint_config`, `resolve_config`); its weights are the `backbone.*` entries. LoRA
  adapters in it (`*.lora_a`, `*.lora_b`) are merged with the `lora` hyper-parameters (rank,
  alpha) saved beside them (`backbone_state`).
- A reward model is recognised by its `value_head.weight` entry, never by a class name that
  a refactor could change; `LoadedModel.rewards` reads it at the last labelled token, as the
  reward stage does.
- Checkpoint files are checked before `torch.load` (`check_checkpoint_file`): a missing,
  truncated or foreign file raises `CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmstages.errors import ConfigError, UserError
from llmstages.losses import last_target_positions
from llmstages.model.config import ModelConfig
from llmstages.model.lora import LoRAConfig, base_state_dict, is_adapter_name, merge_lora_state_dict
from llmstages.model.transformer import Transformer

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "backbone_state",
    "check_checkpoint_file",
    "check_init_from",
    "checkpoint_config",
    "load_backbone_weights",
    "load_checkpoint_file",
    "load_model",
    "resolve_config",
]

BACKBONE_PREFIX = "backbone."


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, unreadable or unsafe to write; the message names the file."""


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """`path` if it is a readable, complete torch checkpoint file, else a CheckpointError saying why.

    Cheap: a torch checkpoint is a zip archive, and a truncated one has lost its central
    directory (at the end of the file), which `zipfile` reads without touching the tensors.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a folder, expected a .ckpt file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (a save that never completed)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path}: not a complete torch checkpoint ({size:,} bytes, no zip directory at its end): "
            "the file is truncated (a killed or failed save) or is not a checkpoint"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise CheckpointError(f"checkpoint {path}: a zip archive without torch's data.pkl, not a checkpoint")
    except zipfile.BadZipFile as err:
        raise CheckpointError(f"checkpoint {path}: corrupt archive ({err})") from None
    return path


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = False, **kwargs) -> dict:
    """`torch.load` whose errors name the file and the problem."""
    path = check_checkpoint_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only, **kwargs)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"checkpoint {path}: cannot be loaded ({type(err).__name__}: {err})") from err


def resolve_config(model: ModelConfig | None, preset: str, vocab_size: int | None, init_from: str | None) -> ModelConfig:
    """The backbone's shape: explicit `model`, else a Hugging Face `init_from`'s config.json, else `preset`.

    With a Hugging Face `init_from` the vocabulary is the larger of the checkpoint's
    (which may be padded) and the tokenizer's (which may add a pad token).
    """
    hf_folder = init_from is not None and Path(init_from).is_dir()
    if model is not None:
        config = model
    elif hf_folder:
        from llmstages.model.hf import config_from_hf

        config = config_from_hf(json.loads((Path(init_from) / "config.json").read_text()))
    else:
        config = ModelConfig.from_name(preset)
    if vocab_size is not None and vocab_size != config.vocab_size:
        vocab = max(vocab_size, config.vocab_size) if hf_folder else vocab_size
        config = ModelConfig.from_dict({**config.to_dict(), "vocab_size": vocab})
    return config


def checkpoint_config(hyper_parameters: dict[str, Any]) -> ModelConfig:
    """The backbone's `ModelConfig` as the stage that saved these hyper-parameters built it."""
    hp = hyper_parameters
    model = hp.get("model")
    if isinstance(model, dict):
        model = ModelConfig.from_dict(model)
    return resolve_config(model, hp.get("preset", "tiny"), hp.get("vocab_size"), hp.get("init_from"))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint of an llmstages stage (state_dict and hyper_parameters), or an error naming the file."""
    checkpoint = load_checkpoint_file(path)  # a truncated or foreign file: an error naming it
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    if "hyper_parameters" not in checkpoint:
        raise ConfigError(f"{path} has no 'hyper_parameters': the model's shape cannot be rebuilt")
    return checkpoint


def backbone_state(checkpoint: dict[str, Any], source: str | Path) -> tuple[dict[str, Tensor], bool]:
    """(the backbone's base weights with any LoRA adapters merged, whether adapters were merged)."""
    state = {k[len(BACKBONE_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(BACKBONE_PREFIX)}
    if not any(is_adapter_name(name) for name in state):
        return state, False
    lora = (checkpoint.get("hyper_parameters") or {}).get("lora")
    if not isinstance(lora, dict):
        raise ConfigError(
            f"{source} holds LoRA adapters but its hyper_parameters have no 'lora' settings (rank, alpha): "
            "they cannot be merged"
        )
    return merge_lora_state_dict(state, LoRAConfig.from_dict(lora)), True


@dataclass
class LoadedModel:
    """A ready, eval-mode model with what its users need beside it."""

    model: Transformer
    value_head: Tensor | None = None  # [1, d_model] for a reward model
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    data_hyper_parameters: dict[str, Any] = field(default_factory=dict)
    source: Path = Path()
    lora_merged: bool = False

    @property
    def is_reward_model(self) -> bool:
        return self.value_head is not None

    def to(self, device) -> LoadedModel:
        self.model.to(device)
        if self.value_head is not None:
            self.value_head = self.value_head.to(device)
        return self

    def rewards(self, input_ids: Tensor, labels: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """A reward model's scalar per row, read at its last labelled token (as the reward stage reads it)."""
        if self.value_head is None:
            raise ConfigError(f"{self.source} has no value_head.weight: it is not a reward model")
        rows, cols = last_target_positions(labels)
        head = lambda hidden, weight: (hidden[rows, cols] @ self.value_head.to(hidden.dtype).T).squeeze(-1)  # noqa: E731
        return self.model(input_ids, position_ids=position_ids, head=head)


def load_model(source: str | Path) -> LoadedModel:
    """A `.ckpt` or an HF folder as an eval-mode `Transformer` (LoRA merged) plus its value head."""
    source = Path(source)
    if source.is_dir():
        from llmstages.model.hf import from_hf

        return LoadedModel(model=from_hf(source).eval(), source=source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such checkpoint file or Hugging Face folder")
    checkpoint = read_checkpoint(source)
    hp = dict(checkpoint["hyper_parameters"])
    state, merged = backbone_state(checkpoint, source)
    model = Transformer(checkpoint_config(hp))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"{source}: backbone weights do not match its config: missing {missing[:5]}, "
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


def load_backbone_weights(model: Transformer, source: str | Path) -> None:
    """Copy base weights into `model` from an llmstages checkpoint or a Hugging Face folder (`init_from`).

    A checkpoint trained with LoRA has its adapters merged into the base weights
    first; `model`'s own adapters (if any) are left as they are (B = 0: unchanged output).
    """
    source = Path(source)
    if source.is_dir():
        from llmstages.model.hf import from_hf

        state = grow_vocab(from_hf(source).state_dict(), base_state_dict(model))
    elif source.suffix == ".ckpt":
        state, _ = backbone_state(load_checkpoint_file(source), source)  # errors name the file and the problem
    else:
        raise FileNotFoundError(f"init_from: {source} is neither a Hugging Face folder nor a .ckpt file")
    expected = base_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"init_from {source}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ConfigError(
                f"init_from {source}: {name} has shape {tuple(tensor.shape)}, this model expects "
                f"{tuple(expected[name].shape)} (model config or vocab size differs)"
            )
    model.load_state_dict(state, strict=False)  # every base weight checked above; adapters stay


def grow_vocab(state: dict, expected: dict) -> dict:
    """Give an imported checkpoint's embedding rows for tokens the tokenizer adds (a new pad).

    New rows start at the mean embedding, so the added tokens predict and embed
    like an average token rather than like noise.
    """
    for name in ("embed.weight", "lm_head.weight"):
        if name in state and name in expected and state[name].shape[0] < expected[name].shape[0]:
            old = state[name]
            extra = old.mean(0, keepdim=True).expand(expected[name].shape[0] - old.shape[0], -1)
            state[name] = torch.cat([old, extra])
    return state


def check_init_from(source: str | os.PathLike | None) -> dict | None:
    """Fail before any data is built: `source` must be a readable llmstages `.ckpt` or a Hugging Face
    folder with a config.json. Returns the backbone config a `.ckpt` recorded (None for a folder,
    or an old checkpoint that recorded none)."""
    if source is None:
        return None
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"init_from {path}: a folder without config.json, not a Hugging Face model folder")
        return None
    if not path.exists():
        raise CheckpointError(f"init_from {path}: no such file or folder")
    if path.suffix != ".ckpt":
        raise CheckpointError(f"init_from {path}: neither a Hugging Face folder nor a .ckpt file")
    state = load_checkpoint_file(path, mmap=True)  # memory-mapped: nothing but the header is read here
    model = (state.get("hyper_parameters") or {}).get("model")
    if isinstance(model, dict):
        return dict(model)
    embed = (state.get("state_dict") or {}).get("backbone.embed.weight")
    return {"vocab_size": int(embed.shape[0])} if embed is not None else None
