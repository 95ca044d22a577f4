"""Model configuration: one dataclass, named presets, validation at construction.

Design choices:
- `ModelConfig` is a plain dataclass so jsonargparse/LightningCLI fill it from
  YAML and checkpoints store it as data (never an `nn.Module` as a
  hyper-parameter: Lightning #19906).
- Presets are data, not code paths: `ModelConfig.from_name("tiny", vocab_size=...)`.
- `vocab_size` is usually linked from the data module's tokenizer by the CLI;
  the presets carry the size of the tokenizer their shape is known with.
- Mistakes (heads not dividing the width, ...) raise `ValueError` here, before
  any weight is allocated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


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

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_mlp is None:
            self.d_mlp = 32 * -(-(8 * self.d_model // 3) // 32)
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_mlp", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"ModelConfig: n_head={self.n_head} must divide d_model={self.d_model} "
                f"(head size would be {self.d_model / self.n_head:g})"
            )
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"ModelConfig: n_kv_head={self.n_kv_head} must divide n_head={self.n_head} "
                "(each key/value head serves a whole group of query heads)"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head size {self.head_dim} must be even for RoPE")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("ModelConfig: rope_theta, norm_eps and init_std must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    # unit tests: ~0.2M parameters with a 512-token vocabulary
    "tiny": ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_mlp=176, max_seq_len=512),
    # the README demo: trains in minutes on 2 CPU cores
    "demo": ModelConfig(vocab_size=1024, n_layer=4, n_head=4, n_kv_head=2, d_model=128, d_mlp=352, max_seq_len=256),
    "small": ModelConfig(vocab_size=8192, n_layer=8, n_head=8, n_kv_head=4, d_model=512, d_mlp=1408, max_seq_len=1024),
    # GPT-2 small's shape with Llama blocks
    "124m": ModelConfig(vocab_size=50304, n_layer=12, n_head=12, n_kv_head=12, d_model=768, d_mlp=2048, max_seq_len=1024),
    # Qwen2-0.5B's shape (q/k/v bias, GQA 14:2)
    "qwen2-0.5b": ModelConfig(
        vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, d_model=896, d_mlp=4864,
        max_seq_len=4096, rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True,
    ),
    # Llama-3.2-1B's shape (GQA 32:8, tied embeddings)
    "1b": ModelConfig(
        vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_mlp=8192,
        max_seq_len=4096, rope_theta=500_000.0,
    ),
}
