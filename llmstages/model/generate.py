"""Greedy and temperature sampling for evaluation and chat.

Design choice: the prompt is re-run with every new token (no KV cache).
The stages generate a handful of short replies during validation with small
models, where this costs milliseconds and cannot disagree with the training
forward pass; a KV cache belongs here once generation becomes a workload.
"""

from __future__ import annotations

import torch

from llmstages.model.transformer import Transformer


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
    device = model.output_weight.device
    ids = torch.tensor([prompt], device=device)
    new: list[int] = []
    for step in range(max_new_tokens):
        window = ids[:, -model.config.max_seq_len :]
        logits = model(window)[0, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        else:
            token = int(logits.argmax())
        if token == stop_id:
            for _ in range(max_new_tokens - step - 1 if fixed_steps else 0):
                model(ids[:, -model.config.max_seq_len :])
            return new, True
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return new, False
