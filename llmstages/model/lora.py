"""LoRA adapters on the backbone's linear layers, native (no `peft`).

Design choices:
- `apply_lora` swaps each targeted `nn.Linear` for a `LoRALinear` that keeps
  the very same `weight`/`bias` parameters under the same names and adds
  `lora_a` `[rank, in]` and `lora_b` `[out, rank]` beside them
  (`blocks.0.attn.q_proj.lora_a`). So base-weight checkpoints, `init_from`
  and the HF mapping see the names they always saw; the adapters are extra.
- Every base parameter is frozen; only adapters require grad, so only they
  reach the optimiser and `lora_state_dict` is the trainable state.
- Initialisation as in the LoRA paper: `lora_a` Kaiming-uniform, `lora_b`
  zero, so an adapted model starts equal to its base. The update is
  `(alpha / rank) * B @ A`; dropout acts on the adapter's input only.
- `lora_disabled(model)` switches the adapters off for a forward: the base
  model without a second copy (the DPO reference).
- `merge_lora` folds `B @ A` into the base weights and turns the layers back
  into plain `nn.Linear`; `merge_lora_state_dict` does the same to a saved
  state dict (export from a checkpoint).
- Targets are short names (`q k v o gate up down`); an unknown one, or a set
  that matches no layer, is a `ValueError` naming `lora.targets`.
- Apply adapters before sharding (FSDP2 `fully_shard` sees them as ordinary
  parameters of the block) and before loading base weights, which
  `base_state_dict` names: a base checkpoint has no adapter entries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# short target name -> the linear layer's name inside a block
LORA_TARGETS: dict[str, str] = {
    "q": "attn.q_proj",
    "k": "attn.k_proj",
    "v": "attn.v_proj",
    "o": "attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.targets = list(self.targets)
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"lora.targets {self.targets!r} match no layer"
                + (f" ({', '.join(map(repr, unknown))} unknown)" if unknown else "")
                + f"; choose from {', '.join(LORA_TARGETS)}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoRAConfig":
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"lora: unknown fields {sorted(unknown)}")
        return cls(**data)


class LoRALinear(nn.Linear):
    """`nn.Linear` plus a low-rank update; `weight` and `bias` are the base layer's own parameters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # no fresh weight: the base layer's parameters are reused
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scaling = rank, alpha / rank
        kind = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, **kind))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, **kind))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_enabled = True
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def delta_weight(self) -> Tensor:
        """The update `scaling * B @ A`, shaped like `weight`."""
        return (self.lora_b @ self.lora_a) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.lora_enabled:
            return y
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        return y + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def _target_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    suffixes = tuple("." + LORA_TARGETS[t] for t in config.targets)
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and ("." + name).endswith(suffixes)]


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Add adapters to `model`'s targeted linears in place; freeze everything else. Returns `model`."""
    if any(True for _ in lora_layers(model)):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    names = _target_names(model, config)
    if not names:
        raise ValueError(f"lora.targets {config.targets!r} match no linear layer of this model")
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        adapted = LoRALinear(base, config.rank, config.alpha, config.dropout)
        setattr(parent, child, adapted.train(base.training))  # an eval-mode model stays in eval mode
    return model


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base model (adapters off) inside the block."""
    layers = [module for _, module in lora_layers(model)]
    previous = [module.lora_enabled for module in layers]
    for module in layers:
        module.lora_enabled = False
    try:
        yield model
    finally:
        for module, enabled in zip(layers, previous):
            module.lora_enabled = enabled


def is_adapter_name(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Everything but the adapters: the entries a base-model checkpoint has to provide."""
    return {name: t for name, t in model.state_dict().items() if not is_adapter_name(name)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors (the state a LoRA run trains)."""
    return {name: t for name, t in model.state_dict().items() if is_adapter_name(name)}


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain `nn.Linear` layers, in place.

    Returns `model`, now with exactly the base model's parameter names.
    `requires_grad` flags are left as they are.
    """
    for name, module in list(lora_layers(model)):
        module.weight.add_(module.delta_weight().to(module.weight.dtype))
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight, plain.bias = module.weight, module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model


def merge_lora_state_dict(state: Mapping[str, Tensor], config: LoRAConfig) -> dict[str, Tensor]:
    """A copy of `state` with each `X.lora_a`/`X.lora_b` pair folded into `X.weight` and removed."""
    out = {name: t for name, t in state.items() if not is_adapter_name(name)}
    bases = sorted({name[: -len(".lora_a")] for name in state if name.endswith(".lora_a")})
    for base in bases:
        a, b = state[base + ".lora_a"], state.get(base + ".lora_b")
        weight = state.get(base + ".weight")
        if b is None or weight is None:
            raise ValueError(f"LoRA state for {base} is incomplete (needs {base}.weight, .lora_a and .lora_b)")
        delta = (b.float() @ a.float()) * config.scaling
        out[base + ".weight"] = (weight.float() + delta).to(weight.dtype)
    orphans = [n for n in state if n.endswith(".lora_b") and n[: -len(".lora_b")] not in bases]
    if orphans:
        raise ValueError(f"LoRA state has lora_b without lora_a: {orphans[:5]}")
    return out
