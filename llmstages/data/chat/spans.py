"""Where each message sits in a chat template's rendered text: the replies' character spans.

Design choices:

- Pure text search, no tokenizer and no Jinja: `jinja.HFChatTemplate`
  renders a conversation once, this module finds each message in that text in
  order, and the template maps the reply spans to tokens.
- A reply is the template's rendering of its content (as is, trimmed,
  newline-stripped, or with `<think>` dropped, as templates do) followed
  directly by the end-of-turn marker; the earliest such end wins, then the
  longest form. User and system messages move a cursor past themselves, so a
  reply never matches inside one.
- Only what the template renders can carry loss: reasoning a template drops
  from history is not trained; reasoning it keeps (even reformatted, Qwen3's
  final turn) is part of the span. Scaffolding the model did not write, such
  as the empty `<think>\\n\\n</think>\\n\\n` Qwen3/minimind/SmolLM3 insert
  between header and reply, is outside every span, so a model is not taught
  to emit it. A reply the template rewrites beyond these forms is an error,
  not a guess. New reply parts (tool calls) are located here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Markers", "ReplySpan", "locate_replies", "special_at"]

@dataclass(frozen=True)
class Markers:
    """The special tokens of one tokenizer as a template writes them; `eot` ends every reply."""

    specials: tuple[str, ...]  # special token strings, longest first
    eot: str
    eot_id: int


@dataclass(frozen=True)
class ReplySpan:
    """Where one assistant reply sits in a rendering."""

    message: int  # index in the conversation
    start: int  # character span of the rendered reply
    end: int


def special_at(text: str, pos: int, specials: Sequence[str]) -> str | None:
    """The special token that starts at `text[pos]`, if any."""
    for token in specials:  # longest first, so a marker never matches by its prefix
        if text.startswith(token, pos):
            return token
    return None


def _reply_forms(content: str) -> tuple[list[str], bool]:
    """How templates render a reply (as is, trimmed, think dropped), and whether one form is empty."""
    forms = [content, content.strip(), content.lstrip("\n"), content.strip("\n"), content.rstrip()]
    if "</think>" in content:
        answer = content.split("</think>")[-1]
        forms += [answer, answer.lstrip("\n"), answer.strip(), answer.lstrip()]
    unique = list(dict.fromkeys(forms))
    return [f for f in unique if f], "" in unique


def _reasoning(content: str) -> str:
    """The reasoning the model wrote before `</think>` (empty when none)."""
    if "</think>" not in content:
        return ""
    return content.split("</think>")[0].split("<think>")[-1].strip()


def locate_replies(text: str, msgs: list[tuple[str, str]], markers: Markers, template: str) -> list[ReplySpan]:
    """Every assistant reply's character span in the full rendering `text` of `msgs`, in order.

    `template` is the template's name, for the errors.
    """
    replies: list[ReplySpan] = []
    cursor = 0
    for i, (role, content) in enumerate(msgs):
        if role == "assistant":
            reply = _locate_reply(text, content, cursor, markers)
            if reply is None:
                raise ValueError(
                    f"message {i}: chat template {template!r} renders this assistant reply in a form "
                    "the loss mask cannot locate (not as written, trimmed, or with <think> dropped)"
                )
            start, end = reply
            replies.append(ReplySpan(i, start, end))
            cursor = end + len(markers.eot)
        else:
            moved = _skip_context(text, role, content, cursor, markers)
            if moved is None:
                raise ValueError(
                    f"message {i}: chat template {template!r} does not render this {role} message as "
                    "written (or trimmed), so the replies around it cannot be located exactly"
                )
            cursor = moved
    return replies

def _skip_context(text: str, role: str, content: str, cursor: int, markers: Markers) -> int | None:
    """The cursor past a user/system message, so a reply never matches inside it.

    A match is the first occurrence from the cursor (preferably followed by
    a marker), so the cursor never passes the message's true place; a user
    message the template does not render as written (or trimmed) is None
    (an error: its reply could be mistaken for it). A system message the
    rendering lacks leaves the cursor (`HFChatTemplate` reports it).
    """
    forms = [f for f in dict.fromkeys((content, content.strip())) if f]
    for form in forms:  # ended by a marker, as turns usually are
        at = text.find(form, cursor)
        while at >= 0:
            special = special_at(text, at + len(form), markers.specials)
            if special is not None:
                return at + len(form) + len(special)
            at = text.find(form, at + 1)
    for form in forms:  # templates whose turns end in plain text (e.g. "User: ...\n\n")
        at = text.find(form, cursor)
        if at >= 0:
            return at + len(form)
    return cursor if role == "system" or not forms else None

def _locate_reply(text: str, content: str, cursor: int, markers: Markers) -> tuple[int, int] | None:
    forms, may_be_empty = _reply_forms(content)
    best: tuple[int, int] | None = None  # (end, -length): earliest end, then the longest form
    for form in forms:
        at = text.find(form + markers.eot, cursor)
        if at >= 0:
            key = (at + len(form), -len(form))
            best = key if best is None or key < best else best
    if best is not None:
        end = best[0]
        start = end + best[1]
    elif may_be_empty:
        end = text.find(markers.eot, cursor)
        if end < 0:
            return None
        start = end
    else:
        return None
    # Reasoning the template kept (possibly reformatted) is the model's text: include it.
    if _reasoning(content) and "</think>" not in text[start:end]:
        before = text[cursor:start]
        close = before.rstrip().rfind("</think>")
        if close >= 0 and not before[close + len("</think>"):].strip():
            open_ = before.rfind("<think>", 0, close)
            if open_ >= 0 and _reasoning(content) in before[open_:close]:
                start = cursor + open_
    return start, end
