"""Import and export Hugging Face Llama / Mistral / Qwen2 checkpoints (safetensors).

Design choices:
- Only `safetensors` and `json` touch the files; `transformers` is never
  imported (it is a test-only dependency), and nothing reaches the network.
- The config is read from the raw `config.json`, old and new layouts alike:
  RoPE parameters may sit in `rope_parameters` (transformers 5), in
  `rope_scaling` or at the top level (`rope_theta`, transformers 4). Anything
  our backbone would compute differently is refused with a `ValueError`
  naming the field: other architectures, scaled/partial RoPE, an explicit
  `head_dim` != hidden/heads, activations other than SiLU, MLP or output
  projection biases. Missing defaults follow the installed transformers 5.x.
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
- `to_hf` picks Qwen2 when the model has q/k/v biases, else Llama, writes one
  `model.safetensors` (tied embeddings once, as HF expects) and a config that
  both transformers 4.x (`rope_theta`) and 5.x (`rope_parameters`) read.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from llmstages.model.config import ModelConfig
from llmstages.model.transformer import Transformer

__all__ = [
    "ARCHITECTURES",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "hf_tensor_names",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "to_hf",
]

# model_type -> the causal-LM class name transformers registers for it
ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_FAMILY_OF_CLASS = {cls: family for family, cls in ARCHITECTURES.items()}

# transformers 5.x defaults for fields a config.json may omit
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "mistral": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
}
_DEFAULT_ROPE_THETA = 10000.0
_IGNORED_HF_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


# ---------------------------------------------------------------- config


def _family(hf_config: Mapping[str, Any]) -> str:
    """`llama` / `mistral` / `qwen2` from `model_type` and `architectures`."""
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


def _rope_theta(hf_config: Mapping[str, Any]) -> float:
    """The RoPE base, refusing any RoPE variant our backbone does not compute."""
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
    if rope_type != "default":
        raise ValueError(
            f"unsupported RoPE scaling: config.json {field} has rope_type {rope_type!r}; "
            "only plain RoPE ('default') is implemented"
        )
    partial = rope.get("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
    if partial is not None and float(partial) != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor={partial}: RoPE must rotate the whole head")
    theta = rope.get("rope_theta", hf_config.get("rope_theta", _DEFAULT_ROPE_THETA))
    return float(theta)


def _sliding_window(hf_config: Mapping[str, Any], family: str, n_layer: int) -> int | None:
    """The attention window some layer actually uses, or None when all are full attention."""
    if family == "mistral":
        window = hf_config.get("sliding_window", 4096)
        return int(window) if window is not None else None
    if family == "qwen2":
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
    """Translate a Llama/Mistral/Qwen2 `config.json` dict into a `ModelConfig`."""
    family = _family(hf_config)
    defaults = _FAMILY_DEFAULTS[family]

    def required(name: str) -> Any:
        if hf_config.get(name) is None:
            raise ValueError(f"config.json: required field {name!r} is missing")
        return hf_config[name]

    hidden, n_head = int(required("hidden_size")), int(required("num_attention_heads"))
    n_layer = int(required("num_hidden_layers"))
    n_kv_head = hf_config.get("num_key_value_heads") or n_head

    head_dim = hf_config.get("head_dim")
    if head_dim is not None and n_head and head_dim * n_head != hidden:
        raise ValueError(
            f"unsupported head_dim={head_dim}: must equal hidden_size/num_attention_heads = {hidden}/{n_head}"
        )
    act = hf_config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # the same function in transformers' ACT2FN
        raise ValueError(f"unsupported hidden_act={act!r}: the MLP is SwiGLU (silu)")
    if hf_config.get("mlp_bias"):
        raise ValueError("unsupported mlp_bias=true: the MLP projections have no bias")
    if family == "llama" and hf_config.get("attention_bias"):
        # Llama's attention_bias also puts a bias on o_proj, which our backbone lacks
        raise ValueError("unsupported attention_bias=true for llama (o_proj bias); only Qwen2-style q/k/v bias")

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
    return ModelConfig(
        vocab_size=int(required("vocab_size")),
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=int(n_kv_head),
        d_model=hidden,
        d_mlp=int(required("intermediate_size")),
        max_seq_len=max_len,
        rope_theta=_rope_theta(hf_config),
        norm_eps=float(hf_config.get("rms_norm_eps") or defaults["rms_norm_eps"]),
        tie_embeddings=bool(defaults["tie_word_embeddings"] if tie is None else tie),
        qkv_bias=family == "qwen2",
        init_std=float(hf_config.get("initializer_range") or 0.02),
    )


def _resolve_architecture(architecture: str, config: ModelConfig) -> str:
    name = architecture.lower()
    if name == "auto":
        return "qwen2" if config.qkv_bias else "llama"
    family = _FAMILY_OF_CLASS.get(architecture, name)
    if family not in ARCHITECTURES:
        raise ValueError(f"unsupported export architecture {architecture!r}; use auto, {', '.join(ARCHITECTURES)}")
    if config.qkv_bias and family != "qwen2":
        raise ValueError(f"{family} has no q/k/v-only bias; export a model with qkv_bias as 'qwen2'")
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
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
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
    if family in ("llama", "mistral"):
        out["head_dim"] = config.head_dim
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif family == "mistral":
        out["sliding_window"] = None
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
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
    """Load a local HF Llama/Mistral/Qwen2 folder as a `Transformer` with identical weights."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    config = config_from_hf(json.loads(config_file.read_text()))
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


def to_hf(
    model: Transformer,
    path: str | Path,
    *,
    architecture: str = "auto",
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> Path:
    """Write `config.json` + `model.safetensors` that `transformers` loads as `architecture`.

    Token ids, when given, go into `config.json` and a `generation_config.json`;
    the tokenizer is saved separately.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if (path / "model.safetensors.index.json").exists():
        # transformers would find two checkpoints in one folder
        raise FileExistsError(f"{path} already holds a sharded checkpoint (model.safetensors.index.json)")
    config = model.config
    tensors = state_dict_to_hf(model.state_dict(), config, architecture=architecture)
    dtype = model.embed.weight.dtype
    hf_config = config_to_hf(
        config, architecture=architecture, dtype=dtype,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    token_ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if any(v is not None for v in token_ids.values()):
        generation = {k: v for k, v in token_ids.items() if v is not None}
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path
