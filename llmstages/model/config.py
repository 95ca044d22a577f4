"""Model configuration: one dataclass, named presets, validation at construction.

Design choices:
- `ModelConfig` is a plain dataclass so jsonargparse/LightningCLI fill it from
  YAML and checkpoints store it as data (never an `nn.Module` as a
  hyper-parameter: Lightning #19906).
- Presets are data, not code paths: `ModelConfig.from_name("tiny", vocab_size=...)`.
  Their names are also the `Literal` `PresetName`, so the command-line parser
  refuses a mistyped `preset` and its help lists exactly the presets there are.
- `vocab_size` is usually linked from the data module's tokenizer by the CLI;
  the presets carry the size of the tokenizer their shape is known with.
- Mistakes (heads not dividing the width, ...) raise `ValueError` here, before
  any weight is allocated.
- Fields added later (`head_dim`, `qk_norm`, `rope_scaling`) default to the
  old behaviour, so the `to_dict()` of an older checkpoint still loads.
  `head_dim=None` means `d_model // n_head`; Qwen3 sets it explicitly.
- `rope_scaling` holds a RoPE variant's parameters as transformers names them;
  only `rope_type: llama3` (Llama 3.1/3.2) is implemented, and its four
  parameters are required.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from llmstages.errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None  # None: as many as n_head (MHA); 1: MQA; else GQA
    d_model: int = 64
    d_mlp: int | None = None  # None: SwiGLU's 8/3 * d_model, rounded up to a multiple of 32
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # True for Qwen2
    init_std: float = 0.02
    head_dim: int | None = None  # None: d_model // n_head; Qwen3 decouples the two
    qk_norm: bool = False  # True for Qwen3: RMSNorm over each query/key head before RoPE
    rope_scaling: dict[str, Any] | None = None  # None: plain RoPE; {"rope_type": "llama3", ...}

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_mlp is None:
            self.d_mlp = 32 * -(-(8 * self.d_model // 3) // 32)
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_mlp", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ConfigError(
                    f"ModelConfig: n_head={self.n_head} must divide d_model={self.d_model} "
                    f"(head size would be {self.d_model / self.n_head:g}); or set head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_head
        elif not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ConfigError(f"ModelConfig.head_dim must be a positive integer or None, got {self.head_dim!r}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"ModelConfig: n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                "(each key/value head serves a whole group of query heads)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig: head size {self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("ModelConfig: rope_theta, norm_eps and init_std must be positive")
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
        # rebuilt from the preset's own arguments, so derived fields (head_dim) follow the overrides
        return cls(**{**_PRESET_ARGS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**data)


LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_rope_scaling(rope: Any) -> dict[str, Any]:
    """A validated copy of `rope_scaling`: `rope_type` llama3 and its four numbers."""
    if not isinstance(rope, dict):
        raise ConfigError(f"ModelConfig.rope_scaling must be a dict or None, got {rope!r}")
    rope_type = rope.get("rope_type")
    if rope_type != "llama3":
        raise ConfigError(f"ModelConfig.rope_scaling: unsupported rope_type {rope_type!r}; implemented: 'llama3'")
    missing = [k for k in LLAMA3_ROPE_FIELDS if k not in rope]
    unknown = sorted(set(rope) - {"rope_type", *LLAMA3_ROPE_FIELDS})
    if missing or unknown:
        raise ConfigError(f"ModelConfig.rope_scaling (llama3): missing {missing or 'none'}, unknown {unknown or 'none'}")
    out: dict[str, Any] = {"rope_type": "llama3"}
    for key in LLAMA3_ROPE_FIELDS:
        value = rope[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"ModelConfig.rope_scaling.{key} must be a positive number, got {value!r}")
        out[key] = int(value) if key == "original_max_position_embeddings" else float(value)
    if out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ConfigError("ModelConfig.rope_scaling: high_freq_factor must exceed low_freq_factor")
    return out


_PRESET_ARGS: dict[str, dict[str, Any]] = {
    # unit tests: ~0.2M parameters with a 512-token vocabulary
    "tiny": dict(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_mlp=176, max_seq_len=512),
    # the README demo: trains in minutes on 2 CPU cores
    "demo": dict(vocab_size=1024, n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_mlp=352, max_seq_len=256),
    "small": dict(vocab_size=8192, n_layer=8, n_head=8, n_kv_head=4, d_model=512, d_mlp=1408, max_seq_len=1024),
    # GPT-2 small's shape with Llama blocks
    "124m": dict(vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_mlp=2048, max_seq_len=1024),
    # Qwen2-0.5B's shape (q/k/v bias, GQA 14:2)
    "qwen2-0.5b": dict(
        vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, d_model=896, d_mlp=4864,
        max_seq_len=4096, rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True,
    ),
    # Llama-3.2-1B's shape (GQA 32:8, tied embeddings)
    "1b": dict(
        vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_mlp=8192,
        max_seq_len=4096, rope_theta=500_000.0,
    ),
    # Llama-3.2-1B exactly: the "1b" shape with its llama3 RoPE scaling
    "llama3.2-1b": dict(
        vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_mlp=8192,
        max_seq_len=4096, rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    # Qwen3-0.6B's shape (head_dim 128 != 1024/16, q/k norm, no bias, GQA 16:8)
    "qwen3-0.6b": dict(
        vocab_size=151936, n_layer=28, n_head=16, n_kv_head=8, d_model=1024, d_mlp=3072, head_dim=128,
        max_seq_len=4096, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm=True,
    ),
}

PRESETS: dict[str, ModelConfig] = {name: ModelConfig(**args) for name, args in _PRESET_ARGS.items()}

#: The preset names as a type: a stage's `preset` option; the parser refuses anything else.
PresetName = Literal["tiny", "demo", "small", "124m", "qwen2-0.5b", "1b", "llama3.2-1b", "qwen3-0.6b"]
if set(get_args(PresetName)) != set(PRESETS):  # one list of names, checked at import
    raise AssertionError(f"PresetName {get_args(PresetName)} != PRESETS {tuple(PRESETS)}")
