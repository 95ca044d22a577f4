"""Sampling with a KV cache: greedy, temperature, top-k, top-p, batches of prompts.

Design choices:
- `generate_batch` left-pads the prompts, gives every row its own positions
  (0 at its first real token) and an attention mask that hides the padding,
  so each row computes what it computes alone. Prompts are prefilled in one
  forward; each later step feeds only the new token through the KV cache.
  `use_cache=False` reruns the whole sequence every step: the reference the
  tests compare the cache against, and the benchmark's baseline.
- Only the last position goes through the output layer (a `head`), so no
  `[B, T, vocab]` logits are formed during the prefill.
- Sampling order follows transformers: temperature, then top-k, then top-p
  (the smallest set of tokens whose probability reaches `top_p`, at least one).
  Draws happen on the generator's device (the CPU without one), so a seeded
  `torch.Generator` gives the same tokens with and without the cache.
- `fixed_steps` runs `max_new_tokens` forwards whatever stops: sharded
  (FSDP) models gather weights in every forward, so all ranks must run the
  same number of them. Tokens after a row's stop are discarded.
- `generate` keeps its original single-prompt signature (the SFT stage and
  the demo use it). A prompt plus `max_new_tokens` longer than the context
  falls back to the original uncached loop over the last `max_seq_len`
  tokens, which is what it always did there; `generate_batch` refuses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from llmstages.model.transformer import Transformer

TokenCallback = Callable[[int, int], None]


def _last_position(hidden: Tensor, weight: Tensor) -> Tensor:
    return F.linear(hidden[:, -1], weight)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """`logits` `[B, V]` with everything outside the top-k / top-p set at -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the better tokens
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False  # the most likely token always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token of every row `[B]` from float logits `[B, V]` (greedy when temperature is 0)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.multinomial(probs.to(device), 1, generator=generator).squeeze(-1).to(logits.device)


def _check_options(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def _prompt_buffer(prompts: Sequence[Sequence[int]], total: int, pad_id: int, max_seq_len: int) -> tuple[Tensor, Tensor]:
    """One buffer for prompt and generated tokens: prompts right-aligned (left padding marked not real),
    room for the generated tokens after them. Refuses an empty prompt or a buffer past the context."""
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty: generation needs at least one token to continue")
    width = max(lengths)
    if total > max_seq_len:
        raise ValueError(
            f"the longest prompt ({width} tokens) plus max_new_tokens={total - width} exceeds max_seq_len={max_seq_len}"
        )
    ids = torch.full((len(prompts), total), pad_id, dtype=torch.long)
    real = torch.ones(len(prompts), total, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) : width] = torch.as_tensor(list(prompt), dtype=torch.long)
        real[row, : width - len(prompt)] = False
    return ids, real


@torch.no_grad()
def generate_batch(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Iterable[int] = (),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    fixed_steps: bool = False,
    pad_id: int = 0,
    on_token: TokenCallback | None = None,
) -> list[tuple[list[int], bool]]:
    """Continue every prompt; per prompt (new tokens without the stop token, whether it stopped).

    `on_token(row, token)` is called for every kept token as soon as it is
    sampled (streaming). `pad_id` only fills the left padding, which is masked.
    """
    _check_options(max_new_tokens, temperature, top_k, top_p)
    if not prompts:
        return []
    lengths = [len(p) for p in prompts]
    width, rows = max(lengths), len(prompts)
    total = width + max_new_tokens
    ids, real = _prompt_buffer(prompts, total, pad_id, model.config.max_seq_len)
    stop = frozenset(int(i) for i in stop_ids)
    device = model.output_weight.device
    ids, real = ids.to(device), real.to(device)
    padded = min(lengths) != width
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    cache = model.new_cache(total) if use_cache else None

    new: list[list[int]] = [[] for _ in range(rows)]
    stopped = [False] * rows
    end = width
    for step in range(max_new_tokens):
        start = cache.length if cache is not None else 0
        logits = model(
            ids[:, start:end],
            position_ids=positions[:, start:end],
            attention_mask=real[:, :end] if padded else None,
            cache=cache,
            head=_last_position,
        )
        tokens = sample_next(logits.float(), temperature, top_k, top_p, generator)
        for row, token in enumerate(tokens.tolist()):
            if stopped[row]:
                continue  # this row ended earlier
            if token in stop:
                stopped[row] = True
            else:
                new[row].append(token)
                if on_token is not None:
                    on_token(row, token)
        if step + 1 == max_new_tokens or (all(stopped) and not fixed_steps):
            break
        ids[:, end] = tokens
        end += 1
    return list(zip(new, stopped))


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    stop_id: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    fixed_steps: bool = False,
) -> tuple[list[int], bool]:
    """Continue `prompt`; returns (new tokens without the stop token, whether it stopped).

    `fixed_steps` always runs `max_new_tokens` forward passes (results after the
    stop are discarded): sharded (FSDP) models gather weights in every forward,
    so all ranks must run the same number of them.
    """
    if prompt and len(prompt) + max_new_tokens <= model.config.max_seq_len:
        stops = () if stop_id is None else (stop_id,)
        [result] = generate_batch(
            model, [prompt], max_new_tokens, stop_ids=stops, temperature=temperature,
            generator=generator, fixed_steps=fixed_steps,
        )
        return result
    return _generate_windowed(model, prompt, max_new_tokens, stop_id, temperature, generator, fixed_steps)


def _generate_windowed(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    stop_id: int | None,
    temperature: float,
    generator: torch.Generator | None,
    fixed_steps: bool,
) -> tuple[list[int], bool]:
    """The uncached loop over the last `max_seq_len` tokens, for sequences longer than the context."""
    device = model.output_weight.device
    ids = torch.tensor([prompt], device=device)
    new: list[int] = []
    for step in range(max_new_tokens):
        window = ids[:, -model.config.max_seq_len :]
        logits = model(window, head=_last_position).float()
        token = int(sample_next(logits, temperature, generator=generator)[0])
        if token == stop_id:
            for _ in range(max_new_tokens - step - 1 if fixed_steps else 0):
                model(ids[:, -model.config.max_seq_len :], head=_last_position)
            return new, True
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return new, False
