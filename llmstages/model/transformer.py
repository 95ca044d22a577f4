"""The shared decoder-only Transformer backbone (Llama/Qwen2 family).

Design choices:
- Pre-norm RMSNorm, rotary embeddings (the Llama "rotate half" layout, so
  Hugging Face weights load without permutation; optionally Llama 3's
  frequency scaling), grouped-query attention through
  `scaled_dot_product_attention`, optional Qwen3 q/k RMSNorm per head, SwiGLU
  MLP. Nothing else.
- Packed sequences: with `document_ids` attention is causal within a document
  and nothing across documents, and positions restart at 0 per document, so a
  packed row computes exactly what its documents compute alone, at the cost of
  its documents (sum(length^2), not T^2) and with no `[T, T]` mask:
  per document on CPU, FlexAttention's block mask on CUDA
  (`model.packed_attention`; the dense mask stays as the tests' reference).
  Without `document_ids` attention is plain causal (`is_causal`, the fused
  kernels' fast path); right padding needs no mask because padding only ever
  comes after the real tokens.
- The output layer is applied inside `forward`, through an optional `head`
  callable. Losses pass a head that scores targets in chunks (see
  `llmstages.losses.token_logps`), so `[B, T, vocab]` float32 logits never
  exist at once; keeping it inside `forward` keeps FSDP's parameter gathering
  around it. `hidden_states` is the same computation without the head.
- Incremental decoding: `forward(..., cache=KVCache(...))` appends the new
  tokens' keys and values to a preallocated per-layer cache and attends over
  everything cached. `attention_mask` (1 = real token, HF's convention, over
  the cached and the new tokens) hides left padding; with per-row
  `position_ids` a left-padded batch computes what each row computes alone.
  Every query may attend to itself, so a padding row is never empty (no NaN).
- `activation_checkpointing = True` recomputes each block in the backward
  pass (`torch.utils.checkpoint`, non-reentrant) instead of storing its
  activations; it is off for no-grad and cached forwards. Parameter names do
  not change, so checkpoints and the HF mapping are unaffected.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from llmstages.model.config import ModelConfig
from llmstages.model.packed_attention import DocumentBlockMask, DocumentSpans, PackedAttention, PackedRows, packed_rows

Head = Callable[[Tensor, Tensor], Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32 whatever the compute dtype, as Llama does
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> Tensor:
    """RoPE inverse frequencies `[head_dim / 2]`, with Llama 3's scaling when `scaling` says so.

    llama3 keeps high frequencies (wavelength below the original context /
    high_freq_factor), divides low ones (above context / low_freq_factor) by
    `factor`, and interpolates smoothly in between, as transformers computes it.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, smoothed, scaled)


def rope_angles(
    position_ids: Tensor, head_dim: int, theta: float, scaling: dict | None = None
) -> tuple[Tensor, Tensor]:
    """cos/sin tables `[B, T, head_dim]` for the given integer positions."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, device=position_ids.device)
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` `[B, H, T, D]` by the angles `[B, T, D]` (rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotated * sin


def positions_from_documents(document_ids: Tensor) -> Tensor:
    """Position of every token inside its document: restarts at 0 where the id changes."""
    batch, length = document_ids.shape
    index = torch.arange(length, device=document_ids.device).expand(batch, length)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def padding_mask(attention_mask: Tensor, query_length: int) -> Tensor:
    """Boolean attention mask `[B, 1, q, K]` for the last `query_length` of K positions.

    Causal, and key positions where `attention_mask` is 0 are hidden; each
    query still sees itself, so a padding query's row is never empty.
    """
    keys = attention_mask.shape[1]
    key_pos = torch.arange(keys, device=attention_mask.device)
    query_pos = key_pos[keys - query_length :, None]
    allowed = (key_pos <= query_pos) & attention_mask.bool()[:, None, None, :]
    return allowed | (key_pos == query_pos)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_length`.

    Storage is allocated on the first write with the keys' dtype and device,
    so the cache follows autocast and the model's device by itself.
    """

    def __init__(self, n_layer: int, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0  # tokens cached (the same for every row)
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store `k`, `v` `[B, H, t, D]` after the cached tokens; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KVCache holds {self.max_length} tokens; {end} were written")
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Called by the model after every layer has stored the `n` new tokens."""
        self.length += n


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d = config.d_model
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | PackedRows | None,
        cache: KVCache | None = None, layer: int = 0,
    ) -> Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_head, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        gqa = self.n_kv_head != self.n_head
        if isinstance(mask, (DocumentSpans, DocumentBlockMask)):
            y = mask.attention(q, k, v, gqa)
        else:
            causal = mask is None
            if cache is not None:
                causal = causal and cache.length == 0  # one new token attends to all of the cache
                k, v = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_mlp, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_mlp, bias=False)
        self.down_proj = nn.Linear(config.d_mlp, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | PackedRows | None,
        cache: KVCache | None = None, layer: int = 0,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


def _not_a_view(value):
    if isinstance(value, Tensor) and value.requires_grad and value._base is not None:
        return value.clone()
    return value


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.activation_checkpointing = False  # a switch, not part of the shape: set it on the built model
        # packed rows' attention (`model.packed_attention`): auto = FlexAttention on CUDA, per document elsewhere
        self.packed_attention: PackedAttention = "auto"
        self.init_weights()

    @property
    def output_weight(self) -> Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def init_weights(self) -> None:
        """Normal(0, init_std); residual output projections scaled by 1/sqrt(2 * n_layer) (GPT-2)."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def new_cache(self, max_length: int) -> KVCache:
        """An empty KV cache for up to `max_length` tokens per row (prompt and generated)."""
        if max_length > self.config.max_seq_len:
            raise ValueError(f"KV cache length {max_length} exceeds max_seq_len={self.config.max_seq_len}")
        return KVCache(self.config.n_layer, max_length)

    def hidden_states(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Final-norm hidden states `[B, T, d_model]`.

        With a `cache`, `input_ids` are the tokens after the cached ones; positions
        then default to continuing the cache. `attention_mask` `[B, cached + T]`
        marks real tokens (1) and padding (0).
        """
        past = 0 if cache is None else cache.length
        length = past + input_ids.shape[1]
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len={self.config.max_seq_len}")
        mask = None
        if document_ids is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("document_ids (packed rows) cannot be combined with a KV cache or an attention_mask")
            mask = packed_rows(document_ids, self.packed_attention)
            if position_ids is None:
                position_ids = positions_from_documents(document_ids)
        elif attention_mask is not None:
            if attention_mask.shape != (input_ids.shape[0], length):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(input_ids.shape[0], length)} "
                    "(cached plus new tokens)"
                )
            mask = padding_mask(attention_mask, input_ids.shape[1])
        elif past and input_ids.shape[1] > 1:
            mask = padding_mask(torch.ones(input_ids.shape[0], length, dtype=torch.bool, device=input_ids.device),
                                input_ids.shape[1])
        if position_ids is None:
            position_ids = torch.arange(past, length, device=input_ids.device).expand_as(input_ids)
        cos, sin = rope_angles(position_ids, self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)
        x = self.embed(input_ids)
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, layer)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.norm(x)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        head: Head | None = None,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Logits `[B, T, vocab]`, or `head(hidden_states, output_weight)` when a head is given."""
        hidden = self.hidden_states(input_ids, position_ids, document_ids, attention_mask, cache)
        if head is not None:
            out = head(hidden, self.output_weight)
            # FSDP2 hooks the root module's grad-carrying outputs, and a view there would lose that hook
            # under an in-place op (torch warns on every step); heads return small [B, T] results to copy
            if isinstance(out, tuple):
                return tuple(_not_a_view(t) for t in out)
            return _not_a_view(out)
        return F.linear(hidden, self.output_weight)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - self.embed.weight.numel() if exclude_embeddings else total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix.

        6 * (matmul parameters, the output layer included once) plus the
        attention score/value products 12 * n_layer * (n_head * head_dim) * seq_len.
        """
        cfg = self.config
        seq_len = seq_len or cfg.max_seq_len
        matmul_params = self.num_parameters(exclude_embeddings=True) + cfg.vocab_size * cfg.d_model
        if self.lm_head is not None:
            matmul_params -= self.lm_head.weight.numel()  # counted in the line above already
        return 6.0 * matmul_params + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
