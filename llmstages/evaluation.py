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
- `samples`: prompt, reply, reference, stopped, for logs and tables.

`fixed_steps` keeps every rank running the same number of forward passes
(FSDP all-gathers weights in each forward, so ranks must not diverge).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmstages.data.answers import exact_match
from llmstages.model.generate import generate



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
    for prompt, reference, ref_ids in zip(prompts, references, reference_ids):
        new, did_stop = generate(model, prompt, max_new_tokens, stop_id=stop_id, fixed_steps=fixed_steps)
        reply = tokenizer.decode(new, skip_special_tokens=True)
        first += bool(new) and bool(ref_ids) and new[0] == ref_ids[0]
        stopped += did_stop
        exact += exact_match(reply, reference, did_stop)
        samples.append({"prompt": tokenizer.decode(prompt), "reply": reply, "reference": reference, "stopped": did_stop})
    model.train(was_training)
    n = len(prompts)
    return {"first_token_acc": first / n, "stop_rate": stopped / n, "exact_match": exact / n, "samples": samples}


def log_reply_samples(module, samples: list[dict], tag: str = "sample", key: str = "val/samples") -> None:
    """Print the first few replies (rank 0) and send all of them to a logger that takes tables (W&B)."""
    from lightning.pytorch.utilities import rank_zero_info

    for sample in samples[:3]:
        rank_zero_info(f"[{tag}] {sample['reply']!r} (reference {sample['reference']!r}, stopped={sample['stopped']})")
    logger = module.logger
    if module.trainer.is_global_zero and logger is not None and hasattr(logger, "log_text"):
        columns = ["prompt", "reply", "reference", "stopped"]
        logger.log_text(key=key, columns=columns, data=[[s[c] for c in columns] for s in samples])
