"""Where each message sits in a chat template's rendered text: the replies' character spans.

Design choices:

- Pure text search, no tokenizer and no Jinja: `jinja.HFChatTemplate`
  renders a conversation (and, per reply, the same conversation with that
  reply replaced by a sentinel); this module finds each message in that text
  in order, and the template maps the reply spans to tokens.
- A reply is what the template writes where the model writes: it starts where
  the full rendering stops agreeing with the renderings of the conversation up
  to that reply with the reply replaced by a sentinel (the common prefix is the
  template's: headers, scaffolding), and ends at the first end-of-turn marker
  after that (a reply never contains one: `jinja.py` refuses special-token
  strings in content, reasoning and tool calls). Two sentinels with different
  first characters make the start exact whatever the reply starts with. Later
  messages are left out of the sentinel renderings, so a template that checks
  the whole conversation (Mistral's role alternation) still accepts them. So a
  reply's span holds whatever the template renders for it, in its own format:
  content (as is, trimmed), reasoning where the template keeps it (Qwen3's
  final turn reformats it to `<think>\n…\n</think>\n\n`), tool calls
  (`<tool_call>…`, Llama-3.1's JSON, `[TOOL_CALLS]…`) - and nothing the
  template inserts before every reply, such as the empty
  `<think>\n\n</think>\n\n` scaffolding of Qwen3/minimind/SmolLM3, so a model
  is not taught to emit it. The `<think>` that opens kept reasoning is the
  model's (Qwen3's generation prompt stops before it), so it belongs to the span.
- The span is checked, never guessed: it must end at a special token (the
  end-of-turn), hold the reply's answer (as written, trimmed or with
  `<think>` dropped) and each tool call's name; otherwise the template
  rewrote the reply beyond recognition, or dropped its tool calls, and that
  is an error. User, system and tool messages move a cursor past themselves,
  so a reply never matches inside one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["SENTINELS", "Markers", "ReplySpan", "locate_replies", "special_at"]

#: Replacement replies whose first characters differ.
SENTINELS = ("@llmstages sentinel A@", "#llmstages sentinel B#")

_OPEN_THINK = re.compile(r"<think>\s*$")


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


def answer_forms(content: str) -> list[str]:
    """How templates render a reply's answer (as is, trimmed, reasoning dropped); non-empty forms only."""
    forms = [content, content.strip(), content.lstrip("\n"), content.strip("\n"), content.rstrip()]
    if "</think>" in content:
        answer = content.split("</think>")[-1]
        forms += [answer, answer.lstrip("\n"), answer.strip(), answer.lstrip()]
    return [f for f in dict.fromkeys(forms) if f]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def locate_replies(
    text: str,
    msgs: Sequence[Mapping[str, Any]],
    markers: Markers,
    template: str,
    variants: Callable[[int, bool], Sequence[str]],
) -> list[ReplySpan]:
    """Every assistant reply's character span in the full rendering `text` of `msgs`, in order.

    `variants(i, whole)` renders the conversation up to reply `i` (`whole`: all
    of it), that reply replaced by each of `SENTINELS`; the whole conversation
    is the fallback for a template that writes something before the reply
    according to later messages (Mistral puts the tool schemas before the last
    user turn). `template` is the template's name, for the errors.
    """
    replies: list[ReplySpan] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            start, end = _reply_span(text, i, m, cursor, markers, template, variants)
            replies.append(ReplySpan(i, start, end))
            cursor = end + len(special_at(text, end, markers.specials) or "")
        else:
            moved = _skip_context(text, m["role"], m["content"], cursor, markers)
            if moved is None:
                raise ValueError(
                    f"message {i}: chat template {template!r} does not render this {m['role']} message as "
                    "written (or trimmed), so the replies around it cannot be located exactly"
                )
            cursor = moved
    return replies


def _reply_span(
    text: str, i: int, m: Mapping[str, Any], cursor: int, markers: Markers, template: str,
    variants: Callable[[int, bool], Sequence[str]],
) -> tuple[int, int]:
    start = min(_common_prefix(text, o) for o in variants(i, False))
    if start < cursor:
        try:
            start = min(_common_prefix(text, o) for o in variants(i, True))
        except ValueError:
            pass  # the template refuses the whole conversation with a sentinel reply: reported below
    end = text.find(markers.eot, start)
    where = f"message {i}: chat template {template!r}"
    if start < cursor or end < 0:
        raise ValueError(
            f"{where} renders this assistant reply in a form the loss mask cannot locate "
            "(its rendering changes text before the reply, or no end-of-turn marker follows it)"
        )
    reply = text[start:end]
    forms = answer_forms(m["content"])
    if forms and not any(f in reply for f in forms):
        raise ValueError(
            f"{where} renders this assistant reply in a form the loss mask cannot locate "
            "(not as written, trimmed, or with <think> dropped)"
        )
    for k, call in enumerate(m.get("tool_calls") or []):
        name = call.get("function", call).get("name", "")
        if name not in reply:
            raise ValueError(f"{where} does not render tool call {k} ({name!r}) of this reply; it would be lost")
    opened = _OPEN_THINK.search(text, cursor, start)
    if "</think>" in reply and opened is not None:
        start = opened.start()  # the <think> that opens kept reasoning is the model's
    return start, end


def _skip_context(text: str, role: str, content: str, cursor: int, markers: Markers) -> int | None:
    """The cursor past a user/system/tool message, so a reply never matches inside it.

    A match is the first occurrence from the cursor (preferably followed by
    a marker), so the cursor never passes the message's true place; a message
    the template does not render as written (or trimmed; a tool result also as
    a JSON string, as Llama-3.1 writes it) is None (an error: its reply could
    be mistaken for it). A system message the rendering lacks leaves the
    cursor (`HFChatTemplate` reports it).
    """
    forms = [content, content.strip()]
    if role == "tool":
        forms.append(json.dumps(content, ensure_ascii=False))
    forms = [f for f in dict.fromkeys(forms) if f]
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
