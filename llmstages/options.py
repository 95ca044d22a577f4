"""Every named option of llmstages, as a typed choice, and the one validator.

Design choices:
- Each option is a `typing.Literal`. Stage and data `__init__`s are annotated
  with these types, so LightningCLI/jsonargparse list the values in `--help`
  and reject a typo at parse time; `check_choice` repeats the check for
  Python callers, with one message format project-wide.
- The tuples of values (`choices(Normalize)`, ...) are derived from the
  Literals, never written twice.
- What each value means is documented where it is implemented (the loss
  masks in `data/chat/loss_mask.py`, normalisation and reductions in `losses.py`,
  packing in `data/packing.py`) and summarised in `docs/design.md`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from llmstages.errors import ConfigError

__all__ = [
    "LossMask",
    "Normalize",
    "LogpReduction",
    "Packing",
    "Truncation",
    "DPOLossType",
    "Reference",
    "OnError",
    "TemplateName",
    "ChatFormat",
    "TextMode",
    "NonFinite",
    "LossAggregation",
    "ScaleRewards",
    "ImportanceSampling",
    "ORPONLLScope",
    "KLReference",
    "RewardErrors",
    "choices",
    "check_choice",
]

# SFT: which tokens of a conversation carry a loss (data/chat/loss_mask.py)
LossMask = Literal["assistant", "last_assistant", "all", "assistant_no_eos", "legacy_drop_first", "legacy_minimind"]
# how summed token losses are divided (losses.reduce_token_loss)
Normalize = Literal["token", "micro_batch", "sequence", "sum"]
# a sequence's log-probability from its token log-probs (losses.sequence_logps)
LogpReduction = Literal["sum", "mean", "legacy_mean_padded"]
# how examples become rows (data/packing.py)
Packing = Literal["none", "documents", "concat"]
# what happens to an example longer than seq_len (data/packing.truncate)
Truncation = Literal["right", "left", "drop"]
# the preference loss (losses.dpo_loss)
DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust", "simpo"]
# which tokens ORPO's NLL term trains (stages/orpo.py): the chosen reply (LLaMA-Factory), or prompt and reply (TRL)
ORPONLLScope = Literal["completion", "prompt_and_completion"]
# over what KTO's reference point z0 is averaged (stages/kto.py): the whole optimiser step, or each micro-batch (TRL)
KLReference = Literal["step", "micro_batch"]
# where DPO's reference log-probs come from (stages/dpo.py)
Reference = Literal["live", "precompute"]
# a bad record in a data file (data/formats.py)
OnError = Literal["raise", "skip"]
# chat templates (data/chat/named.py); auto/hf render the tokenizer's own Jinja template (data/chat/jinja.py)
TemplateName = Literal["chatml", "llama3", "plain", "auto", "hf"]
# chat data file formats (data/formats.py)
ChatFormat = Literal["auto", "alpaca", "sharegpt", "messages"]
# a pretraining text file: one document per line, or the whole file
TextMode = Literal["line", "file"]
# what a non-finite loss or gradient norm does (callbacks.NonFiniteGuard)
NonFinite = Literal["stop", "skip_step"]


def choices(option) -> tuple[str, ...]:
    """The values of a Literal option, in declaration order (the first is the default)."""
    return get_args(option)


def check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
    """`value` if it is one of `allowed`, else a ConfigError naming the option and listing the values."""
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
    return value

# GRPO (stages/grpo/: stage.py, loss.py); every value means what TRL's GRPOTrainer means by it
# how per-token losses become one loss (stages/grpo/loss.aggregate_grpo_loss)
# (TRL's `loss_type`: cispo, sapo, luspo and vespo also change the per-token objective, see stages/grpo/loss.py)
LossAggregation = Literal["dapo", "dr_grpo", "grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"]
# what a group-centred reward is divided by (stages/grpo/loss.group_advantages)
ScaleRewards = Literal["group", "batch", "none"]
# the importance ratio per token, or one per completion (GSPO) (stages/grpo/loss.importance_log_weights)
ImportanceSampling = Literal["token", "sequence"]
# a reward function's None, NaN or infinite value (stages/grpo/rewards.py): an error naming it, or the completion
# is unscorable and left out of its group's statistics and the loss (TRL's NaN-aware behaviour)
RewardErrors = Literal["raise", "exclude"]
