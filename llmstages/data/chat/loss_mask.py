"""The loss mask: which tokens of a conversation carry a loss, for every template.

Design choices:

- One file holds every rule; templates only say where a reply's tokens are
  (its content, its end-of-turn token, what follows before the next turn) and
  call these functions, so a named template and the model's own Jinja
  template cannot disagree on a rule (tests compare them token for token).
- Variants are named (`options.LossMask`); `assistant` is the default and the
  correct one: every reply's content plus its end-of-turn token, nothing
  before or after. `last_assistant` trains only the final reply;
  `assistant_no_eos` leaves the end-of-turn token out (the model never learns
  to stop); `all` labels every token. The `legacy_*` variants reproduce
  published bugs on purpose: `legacy_drop_first` unlabels a reply's first
  token (OpenRLHF #973), `legacy_minimind` also labels what follows the
  end-of-turn token.
- A mask is never silently all zeros: an example with no labelled token
  raises `ValueError("no target tokens")`, and so does an empty reply whose
  end-of-turn token the chosen mask leaves unlabelled.
- Labels are unshifted (`labels[i] = input_ids[i]` or `IGNORE_INDEX`); the
  single shift lives in `llmstages.losses`.
- Reasoning and tool calls are part of a reply's body: a reply is what the
  template renders for the assistant message (reasoning where the template
  keeps it, content, tool calls), located by the templates; the rules here
  apply to it unchanged. A reply with `weight: 0` is context under every mask
  but `all` (`trained_replies`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from llmstages.losses import IGNORE_INDEX
from llmstages.options import LossMask, choices

__all__ = [
    "DEFAULT_LOSS_MASK",
    "LOSS_MASKS",
    "check_loss_mask",
    "check_reply_target",
    "labels_everything",
    "reply_labels",
    "require_targets",
    "trained_replies",
]

LOSS_MASKS: tuple[str, ...] = choices(LossMask)
DEFAULT_LOSS_MASK = "assistant"


def check_loss_mask(loss_mask: str) -> None:
    if loss_mask not in LOSS_MASKS:
        raise ValueError(f"unknown loss_mask {loss_mask!r}; available: {', '.join(LOSS_MASKS)}")


def labels_everything(loss_mask: str) -> bool:
    """Whether the mask labels every token (`all`): prompts, headers and markers too."""
    return loss_mask == "all"


def trained_replies(
    roles: Sequence[str], loss_mask: str, first: int = 0, context: Collection[int] = ()
) -> list[int]:
    """Indices of the messages whose replies carry a loss: the assistant turns from `first` on
    (earlier ones are context, e.g. a preference pair's prompt), only the last under `last_assistant`,
    never one in `context` (a message with `weight: 0`, OpenAI's fine-tuning convention)."""
    replies = [i for i, role in enumerate(roles) if role == "assistant" and i >= first]
    if loss_mask == "last_assistant":
        replies = replies[-1:]
    return [i for i in replies if i not in context]


def reply_labels(body: list[int], eot: list[int], after: list[int], loss_mask: str) -> list[int]:
    """Labels of one trained assistant reply: `body` + `eot` + `after`, each token or `IGNORE_INDEX`.

    `body` is the reply's content tokens, `eot` its end-of-turn token(s), `after`
    what the template writes after it before the next turn (a newline). Every
    mask labels the content; see the module docstring for each variant.
    Which replies are trained is `trained_replies`.
    """
    check_loss_mask(loss_mask)
    ignore = [IGNORE_INDEX]
    if loss_mask == "all":
        return [*body, *eot, *after]
    if loss_mask == "assistant_no_eos":
        return [*body, *ignore * (len(eot) + len(after))]
    target = [*body, *eot]
    if loss_mask == "legacy_drop_first" and target:
        target = ignore + target[1:]
    tail = list(after) if loss_mask == "legacy_minimind" else ignore * len(after)
    return target + tail


def check_reply_target(empty: bool, target: Sequence[int], loss_mask: str) -> None:
    """An empty reply must keep a labelled token (its end-of-turn token); `target` is its labels."""
    if empty and all(t == IGNORE_INDEX for t in target):
        raise ValueError(
            f"empty assistant reply has no target tokens under loss_mask={loss_mask!r} "
            "(an empty reply is trainable only through its end-of-turn token)"
        )


def require_targets(labels: Sequence[int], loss_mask: str) -> None:
    """A whole example must have a labelled token."""
    if all(t == IGNORE_INDEX for t in labels):
        raise ValueError(
            f"no target tokens: every label is {IGNORE_INDEX} under loss_mask={loss_mask!r} "
            "(no assistant reply to train on?)"
        )
