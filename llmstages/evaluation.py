"""Reply quality: what a chat model does when asked, measured one way everywhere.

SFT validation, the demo and the benchmarks all ask held-out prompts and
score greedy replies with `evaluate_replies`:
- `first_token_acc`: the first generated token is the reference reply's first
  token (exactly what OpenRLHF #973's off-by-one never trains);
- `stop_rate`: generation ends with the end-of-turn token within the budget
  (what pad == EOS, TRL #1623, never trains);
- `exact_match`: the reply stopped and equals the reference after stripping
  surrounding whitespace (`data.answers.exact_match`, the one definition, which
  GRPO's reward and validation and `data.synthetic.score_reply` call too);
- `samples`: prompt, reply, reference, stopped, exact_match, for logs and tables.

Prompts are answered `batch_size` at a time through the KV cache
(`model.generate.generate_batch`, each row computing what it would alone); a
prompt too long for one window goes alone through `generate`, which slides.
`fixed_steps` keeps every rank running the same number of forward passes
(FSDP all-gathers weights in each forward, so ranks must not diverge): every
prompt then goes alone, `max_new_tokens` forwards each, because with batches
the count would depend on how many of this rank's prompts fit one window, and
ranks score different prompts (GRPO's validation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmstages.data.answers import exact_match
from llmstages.model.generate import generate, generate_batch



@torch.no_grad()
def evaluate_replies(
    model,
    prompts: Sequence[list[int]],
    references: Sequence[str],
    stop_id: int,
    tokenizer,
    max_new_tokens: int = 24,
    reference_ids: Sequence[list[int]] | None = None,
    fixed_steps: bool = False,
    batch_size: int = 64,
) -> dict:
    """Greedy replies to `prompts` scored against `references` (see the module docstring).

    `reference_ids`: the references as the template tokenises a reply (for
    `first_token_acc`); default `tokenizer.encode(reference)`.
    """
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
    if not prompts:
        raise ValueError("evaluate_replies needs at least one prompt")
    if reference_ids is None:
        reference_ids = [tokenizer.encode(r) for r in references]
    was_training = model.training
    model.eval()
    first = stopped = exact = 0
    samples = []
    replies = greedy_replies(model, prompts, stop_id, max_new_tokens, fixed_steps, batch_size)
    for prompt, reference, ref_ids, (new, did_stop) in zip(prompts, references, reference_ids, replies):
        reply = tokenizer.decode(new, skip_special_tokens=True)
        first += bool(new) and bool(ref_ids) and new[0] == ref_ids[0]
        stopped += did_stop
        right = exact_match(reply, reference, did_stop)
        exact += right
        samples.append({"prompt": tokenizer.decode(prompt), "reply": reply, "reference": reference, "stopped": did_stop,
                        "exact_match": right})
    model.train(was_training)
    n = len(prompts)
    return {"first_token_acc": first / n, "stop_rate": stopped / n, "exact_match": exact / n, "samples": samples}


def greedy_replies(
    model, prompts: Sequence[list[int]], stop_id: int, max_new_tokens: int, fixed_steps: bool = False,
    batch_size: int = 64,
) -> list[tuple[list[int], bool]]:
    """(new tokens, stopped) per prompt, in order: batches of the prompts that fit one window, the rest alone;
    with `fixed_steps` every prompt alone (the same forward count on every rank: see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if fixed_steps:
        return [generate(model, prompt, max_new_tokens, stop_id=stop_id, fixed_steps=True) for prompt in prompts]
    replies: list[tuple[list[int], bool] | None] = [None] * len(prompts)
    fits = [i for i, p in enumerate(prompts) if p and len(p) + max_new_tokens <= model.config.max_seq_len]
    for start in range(0, len(fits), batch_size):
        rows = fits[start : start + batch_size]
        for i, reply in zip(rows, generate_batch(model, [prompts[i] for i in rows], max_new_tokens, stop_ids=(stop_id,))):
            replies[i] = reply
    for i, reply in enumerate(replies):
        if reply is None:
            replies[i] = generate(model, prompts[i], max_new_tokens, stop_id=stop_id)
    return replies


def log_reply_samples(module, samples: list[dict], tag: str = "sample", key: str = "val/samples") -> None:
    """Print the first few replies (rank 0) and send all of them to a logger that takes tables (W&B)."""
    from lightning.pytorch.utilities import rank_zero_info

    for sample in samples[:3]:
        rank_zero_info(f"[{tag}] {sample['reply']!r} (reference {sample['reference']!r}, stopped={sample['stopped']})")
    logger = module.logger
    if module.trainer.is_global_zero and logger is not None and hasattr(logger, "log_text"):
        columns = ["prompt", "reply", "reference", "stopped"]
        logger.log_text(key=key, columns=columns, data=[[s[c] for c in columns] for s in samples])
