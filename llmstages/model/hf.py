"""Import and export Hugging Face Llama / Mistral / Qwen2 / Qwen3 checkpoints (safetensors).

Design choices:
- Only `safetensors` and `json` touch the files; `transformers` is never
  imported (it is a test-only dependency), and nothing reaches the network.
- The config is read from the raw `config.json`, old and new layouts alike:
  RoPE parameters may sit in `rope_parameters` (transformers 5), in
  `rope_scaling` or at the top level (`rope_theta`, transformers 4). Anything
  our backbone would compute differently is refused with a `ValueError`
  naming config.json and the field: other architectures, RoPE types other
  than plain and `llama3`, partial RoPE, activations other than SiLU, MLP or
  output-projection biases. Qwen3 brings q/k RMSNorm and an explicit
  `head_dim` (128 when config.json omits it, as in transformers); Llama and
  Mistral may set `head_dim` too, Qwen2 may not (its attention ignores it in
  older transformers). Missing defaults follow the installed transformers 5.x.
- Sliding-window attention (Mistral, Qwen2 with `use_sliding_window`) equals
  full causal attention while a sequence fits in the window, so the imported
  model's `max_seq_len` is capped at the window (with a warning) and longer
  inputs are refused by `Transformer.forward` instead of silently diverging.
- Tensor names are checked as a set before any tensor is read: missing and
  unexpected names are listed in one error. A tied checkpoint may carry
  `lm_head.weight` or not; HF ignores it when tied, so do we (with a warning
  if it differs from the embedding). Stale `rotary_emb.inv_freq` buffers of
  old Llama checkpoints are skipped: they are recomputed, never learned.
- `from_hf(dtype=None)` returns float32 weights, the master-weight dtype
  Lightning's mixed precision expects; pass `dtype=torch.bfloat16` to keep a
  bf16 checkpoint's footprint. The model is built on the meta device and the
  read tensors are assigned, so no random init is paid for.
- `to_hf` picks Qwen3 when the model has q/k norms, Qwen2 when it has q/k/v
  biases, else Llama, writes one `model.safetensors` (tied embeddings once, as
  HF expects) and a config that both transformers 4.x (`rope_theta`,
  `rope_scaling`) and 5.x (`rope_parameters`) read.
- Export is ready for use when given a tokenizer: `tokenizer.json`, its
  special tokens, the Jinja `chat_template` in `tokenizer_config.json`, and a
  `generation_config.json` whose `eos_token_id` lists every stop id (the
  template's end-of-turn and the end of text), so `generate` stops after a
  reply. A named `ChatTemplate` writes itself as Jinja (`ChatTemplate.jinja`).
- A reward model exports as `<Family>ForSequenceClassification` with
  `score.weight` = the value head and `pad_token_id` set: transformers reads
  the score at the last non-pad token of each row. Our `RewardModule` reads
  it at the last labelled token, which for our preference data is the
  reply's end-of-turn token, the last real token of the sequence; so on
  right-padded rows without trailing text the two agree. The exported chat
  template is wrapped so `apply_chat_template` ends at the last end-of-turn
  token (`reward_chat_template`): scored through it, the export reads the
  position it trained on, not the newline chatml puts after `<|im_end|>`.
- A tokenizer whose pad token was appended to a folder without one (Llama
  3.x) has one token more than the model has rows. A causal-LM export drops
  that pad (tokenizer and embedding agree, `pad_token_id` unset, as the
  folder came); a reward export keeps it and adds a zero embedding row,
  because transformers needs a pad id to find each row's last token. A model
  trained with a pad row keeps row and token.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from llmstages.model.config import LLAMA3_ROPE_FIELDS, ModelConfig
from llmstages.model.transformer import Transformer

__all__ = [
    "ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "hf_tensor_names",
    "reward_chat_template",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "to_hf",
    "to_hf_reward",
]

# model_type -> the causal-LM class name transformers registers for it
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_FAMILY_OF_CLASS = {cls: family for family, cls in ARCHITECTURES.items()}
# model_type -> the sequence-classification class (reward models)
REWARD_ARCHITECTURES: dict[str, str] = {
    family: cls.replace("ForCausalLM", "ForSequenceClassification") for family, cls in ARCHITECTURES.items()
}

# transformers 5.x defaults for fields a config.json may omit
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "mistral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "head_dim": 128},
}
_DEFAULT_ROPE_THETA = 10000.0
_IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


# ---------------------------------------------------------------- config


def _family(hf_config: Mapping[str, Any]) -> str:
    """`llama` / `mistral` / `qwen2` / `qwen3` from `model_type` and `architectures`."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch not in _FAMILY_OF_CLASS:
            raise ValueError(
                f"unsupported architecture {arch!r} in config.json 'architectures'; "
                f"supported: {', '.join(ARCHITECTURES.values())}"
            )
    model_type = hf_config.get("model_type")
    if model_type is not None and model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(ARCHITECTURES)}"
        )
    families = {_FAMILY_OF_CLASS[a] for a in archs}
    if model_type is not None:
        # transformers dispatches on model_type; a contradicting class name means a hand-edited config
        if families and families != {model_type}:
            raise ValueError(f"config.json: architectures {archs} contradict model_type {model_type!r}")
        return model_type
    if len(families) != 1:
        raise ValueError("config.json names neither a supported 'model_type' nor one supported 'architectures' entry")
    return families.pop()


def _rope(hf_config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """The RoPE base and llama3 scaling (or None), refusing any RoPE variant our backbone does not compute."""
    # transformers gives `rope_scaling` priority over `rope_parameters` (convert_rope_params_to_dict)
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf_config.get(field)
        if rope:
            break
    else:
        field, rope = "rope_parameters", {}
    if not isinstance(rope, Mapping):
        raise ValueError(f"config.json: {field} must be an object, got {rope!r}")
    if any(isinstance(value, Mapping) for value in rope.values()):
        raise ValueError(f"config.json: per-layer-type {field} are not supported: {dict(rope)}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(
            f"unsupported RoPE scaling: config.json {field} has rope_type {rope_type!r}; "
            "implemented: plain RoPE ('default') and 'llama3'"
        )
    partial = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"unsupported config.json partial_rotary_factor={partial}: RoPE must rotate the whole head")
    theta = float(rope.get("rope_theta", hf_config.get("rope_theta", _DEFAULT_ROPE_THETA)))
    if rope_type == "default":
        return theta, None
    missing = [k for k in LLAMA3_ROPE_FIELDS if rope.get(k) is None]
    if missing:
        raise ValueError(f"config.json: {field} (rope_type 'llama3') lacks {', '.join(missing)}")
    return theta, {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_ROPE_FIELDS}}


def _sliding_window(hf_config: Mapping[str, Any], family: str, n_layer: int) -> int | None:
    """The attention window some layer actually uses, or None when all are full attention."""
    if family == "mistral":
        window = hf_config.get("sliding_window", 4096)
        return int(window) if window is not None else None
    if family in ("qwen2", "qwen3"):
        window = hf_config.get("sliding_window", 4096)
        if not hf_config.get("use_sliding_window", False) or window is None:
            return None  # Qwen2Config drops the window unless use_sliding_window
        layer_types = hf_config.get("layer_types")
        if layer_types is None:
            first = hf_config.get("max_window_layers", 28)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layer)]
        return int(window) if "sliding_attention" in layer_types else None
    return None


def config_from_hf(hf_config: dict) -> ModelConfig:
    """Translate a Llama/Mistral/Qwen2/Qwen3 `config.json` dict into a `ModelConfig`."""
    family = _family(hf_config)
    defaults = _FAMILY_DEFAULTS[family]

    def required(name: str) -> Any:
        if hf_config.get(name) is None:
            raise ValueError(f"config.json: required field {name!r} is missing")
        return hf_config[name]

    hidden, n_head = int(required("hidden_size")), int(required("num_attention_heads"))
    n_layer = int(required("num_hidden_layers"))
    n_kv_head = hf_config.get("num_key_value_heads") or n_head

    head_dim = hf_config.get("head_dim") or defaults.get("head_dim")
    if head_dim is not None and family == "qwen2" and head_dim * n_head != hidden:
        raise ValueError(
            f"unsupported config.json head_dim={head_dim} for qwen2: must equal "
            f"hidden_size/num_attention_heads = {hidden}/{n_head}"
        )
    act = hf_config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # the same function in transformers' ACT2FN
        raise ValueError(f"unsupported config.json hidden_act={act!r}: the MLP is SwiGLU (silu)")
    if hf_config.get("mlp_bias"):
        raise ValueError("unsupported config.json mlp_bias=true: the MLP projections have no bias")
    if family in ("llama", "qwen3") and hf_config.get("attention_bias"):
        # their attention_bias also puts a bias on o_proj, which our backbone lacks
        raise ValueError(
            f"unsupported config.json attention_bias=true for {family} (o_proj bias); only Qwen2-style q/k/v bias"
        )

    max_len = int(hf_config.get("max_position_embeddings") or defaults["max_position_embeddings"])
    window = _sliding_window(hf_config, family, n_layer)
    if window is not None and window < max_len:
        warnings.warn(
            f"{family} sliding_window={window} < max_position_embeddings={max_len}: capping max_seq_len at "
            f"{window}, where windowed attention equals full causal attention",
            stacklevel=3,
        )
        max_len = window

    tie = hf_config.get("tie_word_embeddings")
    rope_theta, rope_scaling = _rope(hf_config)
    return ModelConfig(
        vocab_size=int(required("vocab_size")),
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=int(n_kv_head),
        d_model=hidden,
        d_mlp=int(required("intermediate_size")),
        max_seq_len=max_len,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=float(hf_config.get("rms_norm_eps") or defaults["rms_norm_eps"]),
        tie_embeddings=bool(defaults["tie_word_embeddings"] if tie is None else tie),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        head_dim=None if head_dim is None else int(head_dim),
        init_std=float(hf_config.get("initializer_range") or 0.02),
    )


def _resolve_architecture(architecture: str, config: ModelConfig) -> str:
    name = architecture.lower()
    if name == "auto":
        family = "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"
    else:
        family = _FAMILY_OF_CLASS.get(architecture, name)
    if family not in ARCHITECTURES:
        raise ValueError(f"unsupported export architecture {architecture!r}; use auto, {', '.join(ARCHITECTURES)}")
    if config.qkv_bias and family != "qwen2":
        raise ValueError(f"{family} has no q/k/v-only bias; export a model with qkv_bias as 'qwen2'")
    if config.qk_norm != (family == "qwen3"):
        # Qwen3 always normalises q and k (a norm with unit weight still rescales); no other family does
        raise ValueError(f"q/k norm (qk_norm={config.qk_norm}) exports only as qwen3, not {family}")
    if family == "qwen2" and config.head_dim * config.n_head != config.d_model:
        raise ValueError(f"qwen2 needs head_dim * n_head == d_model; this model has head_dim={config.head_dim}")
    return family


def config_to_hf(
    config: ModelConfig,
    *,
    architecture: str = "auto",
    dtype: torch.dtype = torch.float32,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> dict[str, Any]:
    """The `config.json` dict transformers needs to rebuild `config` as `architecture`."""
    family = _resolve_architecture(architecture, config)
    dtype_name = str(dtype).removeprefix("torch.")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_mlp,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # 5.x reads rope_parameters, 4.x reads the top-level rope_theta; 5.x prefers the former
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})},
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,  # the 4.x name of the same field
    }
    if config.rope_scaling is not None:
        out["rope_scaling"] = dict(out["rope_parameters"])  # the 4.x name
    if family != "qwen2":
        out["head_dim"] = config.head_dim
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif family == "mistral":
        out["sliding_window"] = None
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
        if family == "qwen3":
            out["attention_bias"] = False
    return out


# ---------------------------------------------------------------- tensor names


def _name_pairs(config: ModelConfig, *, with_bias: bool | None = None) -> list[tuple[str, str]]:
    """(our name, HF name) for every tensor of a model with `config`."""
    bias = config.qkv_bias if with_bias is None else with_bias
    pairs = [("embed.weight", "model.embed_tokens.weight")]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        pairs.append((ours + "attn_norm.weight", theirs + "input_layernorm.weight"))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            pairs.append((f"{ours}attn.{proj}.weight", f"{theirs}self_attn.{proj}.weight"))
        if bias:
            for proj in ("q_proj", "k_proj", "v_proj"):
                pairs.append((f"{ours}attn.{proj}.bias", f"{theirs}self_attn.{proj}.bias"))
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                pairs.append((f"{ours}attn.{norm}.weight", f"{theirs}self_attn.{norm}.weight"))
        pairs.append((ours + "mlp_norm.weight", theirs + "post_attention_layernorm.weight"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            pairs.append((f"{ours}mlp.{proj}.weight", f"{theirs}mlp.{proj}.weight"))
    pairs.append(("norm.weight", "model.norm.weight"))
    if not config.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight"))
    return pairs


def hf_tensor_names(config: ModelConfig) -> list[str]:
    """The HF tensor names a checkpoint of `config` holds (tied: no `lm_head.weight`)."""
    return [hf for _, hf in _name_pairs(config)]


def _short_list(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_hf_names(present: Iterable[str], config: ModelConfig) -> set[str]:
    """The names to read; raises listing missing and unexpected tensors."""
    present = {n for n in present if not _IGNORED_HF_TENSORS.fullmatch(n)}
    expected = set(hf_tensor_names(config))
    if config.tie_embeddings:
        present.discard("lm_head.weight")  # tied: HF ignores a stored copy, so may we
    missing, unexpected = expected - present, present - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_short_list(unexpected)}")
        raise ValueError("checkpoint does not match its config.json; " + "; ".join(parts))
    return expected


def state_dict_from_hf(hf_state_dict: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Rename an HF state dict to ours; raises on missing/unexpected tensors."""
    _check_hf_names(hf_state_dict, config)
    _warn_if_untied_copy(hf_state_dict, config)
    return {ours: hf_state_dict[hf] for ours, hf in _name_pairs(config)}


def _full(tensor: Tensor) -> Tensor:
    # FSDP2 shards parameters as DTensors; the export needs the whole tensor
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def state_dict_to_hf(
    state_dict: Mapping[str, Tensor], config: ModelConfig, *, architecture: str = "auto"
) -> dict[str, Tensor]:
    """Rename our state dict to HF names (CPU, contiguous); tied embeddings appear once.

    Exporting a bias-free model as `qwen2` adds zero q/k/v biases, which Qwen2 always has.
    """
    family = _resolve_architecture(architecture, config)
    pairs = _name_pairs(config)
    unexpected = set(state_dict) - {ours for ours, _ in pairs}
    missing = {ours for ours, _ in pairs} - set(state_dict)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the config: missing {_short_list(missing) or 'none'}; "
            f"unexpected {_short_list(unexpected) or 'none'}"
        )
    out = {hf: _full(state_dict[ours]) for ours, hf in pairs}
    if family == "qwen2" and not config.qkv_bias:
        for ours, hf in _name_pairs(config, with_bias=True):
            if hf not in out:
                weight = out[hf.removesuffix(".bias") + ".weight"]
                out[hf] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return out


def _warn_if_untied_copy(tensors: Mapping[str, Tensor], config: ModelConfig) -> None:
    if config.tie_embeddings and "lm_head.weight" in tensors:
        head, embed = tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]
        if head.shape != embed.shape or not torch.equal(head, embed):
            warnings.warn(
                "tie_word_embeddings=true but the checkpoint's lm_head.weight differs from the embedding; "
                "using the embedding, as transformers does",
                stacklevel=3,
            )


# ---------------------------------------------------------------- files


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in set(files.values()):
            if not shard.is_file():
                raise FileNotFoundError(f"shard {shard} listed in {index} does not exist")
        return files
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (found {', '.join(others)}: only safetensors is read)" if others else ""
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}")


def from_hf(path: str | Path, *, dtype: torch.dtype | None = None) -> Transformer:
    """Load a local HF Llama/Mistral/Qwen2/Qwen3 folder as a `Transformer` with identical weights."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such Hugging Face model folder")
        raise FileNotFoundError(f"no config.json in {path} (a Hugging Face model folder needs one)")
    try:
        config = config_from_hf(json.loads(config_file.read_text()))
    except ValueError as error:
        raise ValueError(f"{config_file}: {error}") from None
    files = _weight_files(path)
    needed = _check_hf_names(files, config)
    if config.tie_embeddings and "lm_head.weight" in files:
        needed = needed | {"lm_head.weight"}
    dtype = dtype or torch.float32

    tensors: dict[str, Tensor] = {}
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in needed and files[name] == file:
                    tensors[name] = f.get_tensor(name).to(dtype)
    state = state_dict_from_hf(tensors, config)

    with torch.device("meta"):
        model = Transformer(config)
    shapes = {name: p.shape for name, p in model.state_dict().items()}
    wrong = [f"{name} {tuple(t.shape)} (expected {tuple(shapes[name])})" for name, t in state.items()
             if t.shape != shapes[name]]
    if wrong:
        raise ValueError(f"checkpoint tensors have the wrong shape for config.json: {'; '.join(wrong[:12])}")
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _prepare_folder(path: str | Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if (path / "model.safetensors.index.json").exists():
        # transformers would find two checkpoints in one folder
        raise FileExistsError(f"{path} already holds a sharded checkpoint (model.safetensors.index.json)")
    return path


def _save_weights(tensors: Mapping[str, Tensor], file: Path) -> None:
    """`model.safetensors`, readable like the other files of the folder (safetensors creates it 0600)."""
    save_file(dict(tensors), str(file), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    file.chmod(0o666 & ~umask)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_tokenizer(path: Path, tokenizer: Any, chat_template: str | None, rows: int | None = None) -> None:
    """`tokenizer.json` + `tokenizer_config.json`, with the chat template when given.

    A pad token past the model's `rows` (one the tokenizer appended to a folder that had none) is left out,
    so the written tokenizer has exactly as many tokens as the embedding has rows.
    """
    if tokenizer is None:
        if chat_template is not None:
            raise ValueError("a chat_template is written into tokenizer_config.json: pass the tokenizer too")
        return
    tokenizer.save(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if chat_template is not None:
        config["chat_template"] = chat_template
    if rows is not None and _pad_beyond(tokenizer, rows):
        backend_file = path / "tokenizer.json"
        backend = json.loads(backend_file.read_text(encoding="utf-8"))
        backend["added_tokens"] = [t for t in backend.get("added_tokens", []) if t["id"] != tokenizer.pad_id]
        backend_file.write_text(json.dumps(backend, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        config.pop("pad_token", None)
    _write_json(config_file, config)


def _pad_beyond(tokenizer: Any, rows: int) -> bool:
    """Whether `tokenizer`'s pad is the one token past a model's `rows`; more tokens than that is an error."""
    if tokenizer is None:
        return False
    beyond = tokenizer.vocab_size - rows
    if beyond > (1 if tokenizer.pad_id >= rows else 0):
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model {rows} embedding rows")
    return tokenizer.pad_id >= rows


def _export_state(model: Transformer) -> dict[str, Tensor]:
    """The model's state dict with any LoRA adapters merged into their base weights (the model is unchanged)."""
    from llmstages.model.lora import is_adapter_name, lora_layers

    state = {name: t for name, t in model.state_dict().items() if not is_adapter_name(name)}
    for name, layer in lora_layers(model):
        weight = _full(layer.weight)
        delta = (_full(layer.lora_b).float() @ _full(layer.lora_a).float()) * layer.scaling
        state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return state


def _token_ids(
    tokenizer: Any, bos_token_id: int | None, eos_token_id: int | list[int] | None, pad_token_id: int | None
) -> dict[str, Any]:
    """Token ids for config.json / generation_config.json; a tokenizer fills the ones not given."""
    if tokenizer is not None:
        eos_token_id = tokenizer.eos_id if eos_token_id is None else eos_token_id
        pad_token_id = tokenizer.pad_id if pad_token_id is None else pad_token_id
    if isinstance(eos_token_id, (list, tuple)):
        eos_token_id = list(dict.fromkeys(int(i) for i in eos_token_id))
        eos_token_id = eos_token_id[0] if len(eos_token_id) == 1 else eos_token_id
    return {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}


def to_hf(
    model: Transformer,
    path: str | Path,
    *,
    architecture: str = "auto",
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    tokenizer: Any = None,
    chat_template: str | None = None,
) -> Path:
    """Write `config.json` + `model.safetensors` that `transformers` loads as `architecture`.

    Token ids, when given, go into `config.json` and a `generation_config.json`
    (`eos_token_id` may be a list: every id `generate` stops at). A
    `llmstages.data.tokenizer.Tokenizer` is saved beside the weights, supplies
    eos/pad ids not given, and carries `chat_template` (Jinja) in its
    `tokenizer_config.json`. LoRA adapters are merged into the written weights.
    """
    path = _prepare_folder(path)
    config = model.config
    tensors = state_dict_to_hf(_export_state(model), config, architecture=architecture)
    ids = _token_ids(tokenizer, bos_token_id, eos_token_id, pad_token_id)
    if _pad_beyond(tokenizer, config.vocab_size) and ids["pad_token_id"] == tokenizer.pad_id:
        ids["pad_token_id"] = None  # the folder had no pad and gets none back: its tokenizer matches its rows
    hf_config = config_to_hf(config, architecture=architecture, dtype=model.embed.weight.dtype, **ids)
    _save_weights(tensors, path / "model.safetensors")
    _write_json(path / "config.json", hf_config)
    if any(v is not None for v in ids.values()):
        _write_json(path / "generation_config.json", {k: v for k, v in ids.items() if v is not None})
    _write_tokenizer(path, tokenizer, chat_template, config.vocab_size)
    return path


def to_hf_reward(
    model: Transformer,
    value_head_weight: Tensor,
    path: str | Path,
    *,
    pad_token_id: int | None = None,
    architecture: str = "auto",
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    tokenizer: Any = None,
    chat_template: str | None = None,
) -> Path:
    """Write a reward model (backbone + value head `[1, d_model]`) as `<Family>ForSequenceClassification`.

    transformers scores a row at its last token that is not `pad_token_id`, so
    the pad id is required (from the tokenizer when not given). The LM head,
    unused by a reward model, is not written.
    """
    config = model.config
    head = _full(value_head_weight)
    if tuple(head.shape) != (1, config.d_model):
        raise ValueError(f"value head weight has shape {tuple(head.shape)}; expected (1, {config.d_model})")
    ids = _token_ids(tokenizer, bos_token_id, eos_token_id, pad_token_id)
    if ids["pad_token_id"] is None:
        raise ValueError("a reward-model export needs pad_token_id: transformers scores the last non-pad token")
    family = _resolve_architecture(architecture, config)
    path = _prepare_folder(path)
    tensors = state_dict_to_hf(_export_state(model), config, architecture=family)
    tensors.pop("lm_head.weight", None)
    tensors["score.weight"] = head.to(model.embed.weight.dtype)
    rows = config.vocab_size
    if ids["pad_token_id"] >= rows:
        # transformers needs a pad id to find each row's last token; a reward model has no LM head, so a
        # zero embedding row for it changes no score (padding is never attended to)
        if ids["pad_token_id"] != rows:
            raise ValueError(f"pad_token_id {ids['pad_token_id']} is beyond the model's {rows} embedding rows")
        embed = tensors["model.embed_tokens.weight"]
        tensors["model.embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(1, embed.shape[1])])
        config = ModelConfig.from_dict({**config.to_dict(), "vocab_size": rows + 1})
    hf_config = config_to_hf(config, architecture=family, dtype=model.embed.weight.dtype, **ids)
    hf_config.update(
        architectures=[REWARD_ARCHITECTURES[family]],
        id2label={"0": "LABEL_0"},  # num_labels = 1: one scalar score
        label2id={"LABEL_0": 0},
    )
    _save_weights(tensors, path / "model.safetensors")
    _write_json(path / "config.json", hf_config)
    _write_tokenizer(path, tokenizer, None if chat_template is None else reward_chat_template(chat_template),
                     config.vocab_size)
    return path


def reward_chat_template(chat_template: str) -> str:
    """`chat_template` rendering without trailing whitespace, so a conversation ends at its end-of-turn token.

    transformers scores a sequence classifier at its last non-pad token; chatml-style templates put a
    newline after each `<|im_end|>`, a position the reward model never trained on (it scores the reply's
    end-of-turn token). The whole rendering is captured and right-stripped, nothing else changes.
    """
    return "{%- set rendered -%}" + chat_template + "{%- endset -%}{{- rendered.rstrip() -}}"


