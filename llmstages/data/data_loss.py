"""Loud data loss: when a data set loses more than `LOUD_FRACTION` of its records, say so at start.

Design choices:

- A record is lost when a reader skips it (`on_error: skip`), when encoding drops
  it (too long, reply truncated away, template error) or when truncation cuts it
  (kept, but not as written). Below the threshold the data module's usual info
  line is enough; above it, one warning (rank 0, once per data module) names
  how many records of how many, each reason with its count, and the option that
  changes it (`HINTS`), e.g. 192 of 300 DPO pairs dropped at the default `seq_len`.
- The same text is kept as the data module's `data_loss` (None when below the
  threshold), so a run summary or a tool can show it again.
- Pure text: no I/O, no Lightning; `base.StageData._report` calls it.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["HINTS", "LOUD_FRACTION", "describe_loss"]

#: Losing more than this share of a data set's records is a warning, not an info line.
LOUD_FRACTION = 0.10

#: reason -> what changes it ({seq_len}, {truncation} and the data module's other settings are filled in).
HINTS: dict[str, str] = {
    "too_long_dropped": "longer than seq_len ({seq_len}); raise seq_len, or truncation: right/left keeps them cut",
    "reply_truncated_away": "no reply token left within seq_len ({seq_len}); raise seq_len"
                            " (or truncation: left cuts the oldest context instead of the reply)",
    "prompt_too_long_dropped": "prompt longer than max_prompt_len ({max_prompt_len}); raise max_prompt_len,"
                               " or truncation: left keeps its last tokens",
    "truncated": "cut to seq_len ({seq_len}) with truncation: {truncation}; raise seq_len to keep them whole",
    "prompt_truncated": "prompt cut to max_prompt_len ({max_prompt_len}); raise max_prompt_len to keep it whole",
    "template_error": "the chat template refused them; on_error: raise stops at the first, naming it",
    "no_targets": "no token to train on after the loss mask; check loss_mask and the records' weights",
}
_READER_HINT = "bad records skipped by on_error: skip; on_error: raise stops at the first, naming file, line and field"


def describe_loss(
    name: str, total: int, lost: Mapping[str, int], settings: Mapping[str, object]
) -> str | None:
    """The warning for `lost` (reason -> records) out of `total` records, or None at or under `LOUD_FRACTION`.

    `settings` fills the hints' placeholders (`seq_len`, `truncation`, `max_prompt_len`).
    """
    count = sum(lost.values())
    if total <= 0 or count <= LOUD_FRACTION * total:
        return None
    parts = []
    for reason, n in sorted(lost.items(), key=lambda kv: (-kv[1], kv[0])):
        if n:
            hint = HINTS.get(reason, _READER_HINT)
            parts.append(f"{n} {reason} ({hint.format_map(_Defaulting(settings))})")
    return f"{name}: {count} of {total} records ({count / total:.0%}) lost or cut: " + "; ".join(parts)


class _Defaulting(dict):
    """`format_map` that leaves a missing setting as `?` rather than failing."""

    def __missing__(self, key: str) -> str:
        return "?"
