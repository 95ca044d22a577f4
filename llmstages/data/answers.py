"""What counts as a correct reply to a prompt with a reference answer: one definition.

The synthetic tasks' checker (`synthetic.score_reply`), SFT/GRPO validation and the demo
(`evaluation.evaluate_replies`) and GRPO's `exact_match` reward all call `exact_match`, so the
number in a report, a validation metric and a reward mean the same thing. It lives in the data
layer because the tasks that define correctness are data; evaluation and stages import it downward.
"""

from __future__ import annotations

__all__ = ["exact_match"]


def exact_match(reply: str, reference: str, stopped: bool = True) -> bool:
    """The reply stopped (ended at the end-of-turn token) and equals the reference after stripping surrounding whitespace."""
    return bool(stopped) and reply.strip() == reference.strip()
