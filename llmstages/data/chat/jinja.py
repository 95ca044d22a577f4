"""The model's own chat template (`template: auto`, alias `hf`): Jinja rendering, exact loss mask.

Design choices:

- Rendering matches `transformers`' `apply_chat_template` (an immutable
  sandboxed Jinja environment configured like its own: `trim_blocks`,
  `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a
  `tojson` that does not escape HTML; the named special tokens, `messages`,
  `add_generation_prompt`, `tools=None`, `documents=None` as variables)
  without importing `transformers`; tests compare ids with it.
  The rendered text is tokenised whole, special strings as markers, so the
  ids are the ones the model was trained with (a named template tokenises
  segment by segment; both agree wherever BPE merges do not cross a
  segment boundary).
- Reproducible renders: `date_string` is pinned (default `DEFAULT_DATE_STRING`)
  and `strftime_now` formats that date, so Llama-3.x's "Today Date" and
  Granite's date do not change daily. `date_string=None` uses today.
- The mask comes from one full rendering (`add_generation_prompt=False`),
  never from rendering prefixes and diffing them (Qwen3, QwQ and Phi-3.5 are
  not prefix-stable). `spans.py` finds each reply's characters in that text;
  tokens overlapping a reply's span (by character offsets) plus the
  end-of-turn token are its targets, labelled by `loss_mask.py`'s rules; a
  token straddling the span's start is labelled (it carries reply text).
- The end-of-turn marker is the special token the template writes right
  after a reply (found by rendering a probe conversation): `<|im_end|>`,
  `<|eot_id|>`, `<｜end▁of▁sentence｜>`, `<end_of_turn>`, `<|end|>`, `</s>`...
  Markers come from the tokenizer's special tokens, never guessed strings.
  It is also the stop id for generation.
- `legacy_minimind` adds the whitespace tokens after the end-of-turn token
  (ChatML's newline), as the named templates add their separator.
- Reasoning, tool calls and tools: messages go to the template with every
  field they carry (`reasoning_content`, `tool_calls`, `tool_call_id`,
  `name`; `weight` is ours and stays out) and a `Conversation`'s `tools` as
  `tools=`, so ids equal `apply_chat_template(messages, tools=tools)`. A
  reply is what the template writes where the model writes (`spans.py`: the
  rendering up to the reply compared with the same rendering ending in a
  sentinel reply), so reasoning is trained where the template keeps it and
  tool calls in the template's own format; headers, tool results, schemas
  and inserted scaffolding never. A template that drops tool calls or tool
  schemas (probed with sentinel values, as TRL's `supports_tool_calling`
  does) is an error; a final reply's `reasoning_content` that the template
  never reads is a one-time warning. `<think>`/`</think>` in a reply are the
  template's to parse, not an error.
- `weight: 0` on an assistant message makes it context (`loss_mask.trained_replies`).
- Refusals are loud: a template exception (gemma-2 on a system role) is a
  `ValueError` naming the template; a system message the rendering does not
  contain (Mistral-Nemo drops it unless the conversation ends on a user turn)
  is an error (or a one-time warning with `dropped_system="warn"`); a special
  token string inside a message is an error (the model's template would make
  it a control token; the named templates keep it as text); an example with
  no labelled token is an error.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmstages.data.chat.loss_mask import (
    check_loss_mask,
    check_reply_target,
    labels_everything,
    reply_labels,
    require_targets,
    trained_replies,
)
from llmstages.data.chat.messages import Conversation, Message, is_trained, tools_of, validate_messages
from llmstages.data.chat.spans import SENTINELS, Markers, ReplySpan, locate_replies, special_at
from llmstages.data.tokenizer import Tokenizer
from llmstages.losses import IGNORE_INDEX

log = logging.getLogger(__name__)

#: The date Llama-3.x's own template falls back to; pinned so renders are reproducible.
DEFAULT_DATE_STRING = "26 Jul 2024"
DATE_STRING_FORMAT = "%d %b %Y"
DROPPED_SYSTEM = ("error", "warn")

_PROBE_USER = "llmstages probe question"
_PROBE_REPLY = "llmstages probe reply"
_PROBE_NAME = "llmstages_probe_function"
_PROBE_VALUE = "llmstages_probe_value"
_PROBE_RESULT = "llmstages probe result"
_PROBE_CALL = {
    "id": "probe0001",  # 9 characters: Mistral's templates insist
    "type": "function",
    "function": {"name": _PROBE_NAME, "arguments": {"llmstages_probe_argument": _PROBE_VALUE}},
}
_PROBE_SCHEMA_NAME = "llmstages_probe_schema"
_PROBE_SCHEMA = {
    "type": "function",
    "function": {"name": _PROBE_SCHEMA_NAME, "description": "probe", "parameters": {"type": "object", "properties": {}}},
}
#: Reasoning markers a reply may contain: the templates that know them parse them themselves.
_THINK_MARKERS = ("<think>", "</think>")


def _messages(messages: Sequence[Message]) -> list[Message]:
    """Validated messages (a `Conversation` keeps its tools)."""
    validate_messages(messages)
    return messages if isinstance(messages, Conversation) else list(messages)


# ---------------------------------------------------------------- jinja
def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled in an environment configured like `transformers`'."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile (line {e.lineno}): {e.message}") from None


class HFChatTemplate:
    """A chat template rendered from Jinja source (a `protocol.Template`).

    `source` is usually `tokenizer.chat_template`; `date_string` pins the date
    templates print (None: today); `dropped_system` says what a system message
    the rendering loses does (`error` or `warn`); `template_kwargs` are extra
    variables for the template (e.g. `{"enable_thinking": False}`).
    """

    def __init__(
        self,
        source: str,
        *,
        name: str = "auto",
        date_string: str | None = DEFAULT_DATE_STRING,
        dropped_system: str = "error",
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ValueError("chat template source must be a non-empty Jinja string")
        if dropped_system not in DROPPED_SYSTEM:
            raise ValueError(f"unknown dropped_system {dropped_system!r}; available: {', '.join(DROPPED_SYSTEM)}")
        if date_string is not None:
            try:
                self._date = datetime.strptime(date_string, DATE_STRING_FORMAT)
            except ValueError:
                raise ValueError(f"date_string {date_string!r} is not in the form '26 Jul 2024'") from None
        else:
            self._date = None
        self.name = name
        self.source = source
        self.date_string = date_string
        self.dropped_system = dropped_system
        self.template_kwargs = dict(template_kwargs or {})
        self._compiled = compile_template(source)
        self._markers: weakref.WeakKeyDictionary[Tokenizer, Markers] = weakref.WeakKeyDictionary()
        self._warned_system = False
        self._warned_reasoning = False
        self._parses_reasoning = "</think>" in source  # Qwen3, QwQ, DeepSeek-R1, SmolLM3, minimind
        self._tool_support: weakref.WeakKeyDictionary[Tokenizer, dict[bool, str | None]] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"HFChatTemplate(name={self.name!r}, date_string={self.date_string!r})"

    @property
    def jinja(self) -> str:
        """The Jinja source (what an export writes as the model's chat template)."""
        return self.source

    # The compiled template and the per-tokenizer cache are rebuilt, not pickled.
    def __getstate__(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "name": self.name,
            "date_string": self.date_string,
            "dropped_system": self.dropped_system,
            "template_kwargs": self.template_kwargs,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        source = state.pop("source")
        self.__init__(source, **state)  # type: ignore[misc]

    # ----------------------------------------------------------- rendering
    def _strftime_now(self, fmt: str) -> str:
        return (self._date or datetime.now()).strftime(fmt)

    def render(
        self,
        messages: Sequence[Message],
        tokenizer: Tokenizer | None = None,
        *,
        add_generation_prompt: bool = False,
        eos_token: str | None = None,
    ) -> str:
        """The conversation as the model's template writes it.

        Special tokens come from `tokenizer` (or just `eos_token` when no
        tokenizer is given, as in `ChatTemplate.render`). A `Conversation`'s
        `tools` are passed as `apply_chat_template`'s `tools=`.
        """
        validate_messages(messages)
        tools = tools_of(messages)
        # `weight` is ours, not the template's; every other key goes through as written.
        msgs = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
        if tokenizer is not None:
            variables: dict[str, Any] = dict(tokenizer.special_tokens_map)
        else:
            variables = {"eos_token": eos_token} if eos_token is not None else {}
        if self.date_string is not None:
            variables["date_string"] = self.date_string
        variables.update(self.template_kwargs)
        try:
            return self._compiled.render(
                messages=msgs,
                tools=list(tools) if tools else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                strftime_now=self._strftime_now,
                **variables,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template {self.name!r} refused this conversation: {e}") from None
        except (TypeError, AttributeError, KeyError) as e:  # e.g. string + dict in a template expecting strings
            raise ValueError(f"chat template {self.name!r} cannot render this conversation: {e}") from None

    def _checked_render(self, msgs: list[Message], tokenizer: Tokenizer, add_generation_prompt: bool) -> str:
        markers = self._markers_of(tokenizer)
        for i, m in enumerate(msgs):
            # Reasoning markers in a reply are the template's to parse (Qwen3 splits on </think>).
            allowed = _THINK_MARKERS if m["role"] == "assistant" and self._parses_reasoning else ()
            calls = json.dumps(m.get("tool_calls") or [], ensure_ascii=False)
            for key, value in (("content", m["content"]), ("reasoning_content", m.get("reasoning_content", "")),
                               ("tool_calls", calls)):
                token = next((t for t in markers.specials if t in value and t not in allowed), None)
                if token is not None:
                    where = "" if key == "content" else f"{key} "
                    raise ValueError(
                        f"message {i}: {where}contains the special token string {token!r}; the model's chat "
                        "template would turn it into a control token (a named template keeps it as text)"
                    )
        if any(m.get("tool_calls") for m in msgs):
            self._check_tool_support(tokenizer)
        if tools_of(msgs):
            self._check_tool_support(tokenizer, schemas=True)
        text = self.render(msgs, tokenizer, add_generation_prompt=add_generation_prompt)
        self._check_system(msgs, text)
        return text

    def _check_tool_support(self, tokenizer: Tokenizer, schemas: bool = False) -> None:
        """Refuse a template that drops tool calls (or tool schemas), probed with sentinel values as
        TRL's `supports_tool_calling` does: a silent loss of the very thing the data teaches."""
        known = self._tool_support.setdefault(tokenizer, {})
        if schemas in known:
            problem = known[schemas]
        else:
            probe = Conversation(
                [
                    {"role": "user", "content": _PROBE_USER},
                    {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
                    {"role": "tool", "content": _PROBE_RESULT, "tool_call_id": _PROBE_CALL["id"], "name": _PROBE_NAME},
                    {"role": "assistant", "content": _PROBE_REPLY},
                ],
                tools=[_PROBE_SCHEMA] if schemas else None,
            )
            wanted = [_PROBE_SCHEMA_NAME] if schemas else [_PROBE_NAME, _PROBE_VALUE]
            try:
                text = self.render(probe, tokenizer)
                missing = [w for w in wanted if w not in text]
                problem = f"its rendering of a probe drops {missing}" if missing else None
            except ValueError as e:
                problem = f"it refuses a probe: {e}"
            known[schemas] = problem
        if problem is not None:
            what = "tool schemas (`tools`)" if schemas else "tool calls (`tool_calls`)"
            raise ValueError(
                f"chat template {self.name!r} does not render {what}: {problem}; training on it would "
                "silently lose them. Use a model whose chat template supports tool calling"
            )

    def _check_system(self, msgs: list[Message], text: str) -> None:
        for i, m in enumerate(msgs):
            content = m["content"]
            if m["role"] != "system" or not content.strip() or content.strip() in text:
                continue
            problem = (
                f"message {i}: chat template {self.name!r} drops or rewrites this system message "
                f"({content.strip()[:40]!r} is not in the rendering)"
            )
            if self.dropped_system == "error":
                raise ValueError(
                    problem + "; remove system messages, use a named template (chatml, llama3, plain), "
                    "or accept the loss with dropped_system='warn'"
                )
            if not self._warned_system:
                log.warning("%s; continuing without it (dropped_system='warn', warned once)", problem)
                self._warned_system = True

    # ----------------------------------------------------------- markers
    def _markers_of(self, tokenizer: Tokenizer) -> Markers:
        cached = self._markers.get(tokenizer)
        if cached is not None:
            return cached
        specials = tokenizer.special_tokens
        probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]
        text = self.render(probe, tokenizer)
        at = text.find(_PROBE_REPLY)
        if at < 0:
            raise ValueError(
                f"chat template {self.name!r} does not render an assistant reply as written "
                f"(probe reply {_PROBE_REPLY!r} is not in its rendering), so no loss mask can be derived from it"
            )
        end = at + len(_PROBE_REPLY)
        eot = special_at(text, end, specials)
        if eot is None:
            raise ValueError(
                f"chat template {self.name!r}: no end-of-turn marker: after a reply it writes "
                f"{text[end:end + 24]!r}, which does not start with a special token of this tokenizer"
            )
        markers = Markers(specials, eot, tokenizer.token_to_id(eot))
        self._markers[tokenizer] = markers
        return markers

    def stop_token_id(self, tokenizer: Tokenizer) -> int:
        """The end-of-turn id: the special token the template writes right after a reply."""
        return self._markers_of(tokenizer).eot_id

    # ----------------------------------------------------------- encoding
    def _sentinel_renders(self, msgs: list[Message], i: int, tokenizer: Tokenizer, whole: bool = False) -> list[str]:
        """The conversation up to reply `i` (`whole`: all of it), that reply replaced by each sentinel
        (no reasoning, no tool calls): what the template writes before the model's part. Later
        messages are left out first, so a template that checks the whole conversation (Mistral's
        role alternation) accepts it."""
        out = []
        for sentinel in SENTINELS:
            other = Conversation(msgs if whole else msgs[: i + 1], tools=tools_of(msgs))
            other[i] = {"role": "assistant", "content": sentinel}
            out.append(self.render(other, tokenizer))
        return out

    def _encode_full(
        self, msgs: list[Message], tokenizer: Tokenizer, loss_mask: str, trained_from: int = 0
    ) -> dict[str, list[int]]:
        """ids + labels of one full rendering; replies before `trained_from` stay context."""
        markers = self._markers_of(tokenizer)
        text = self._checked_render(msgs, tokenizer, add_generation_prompt=False)
        ids, offsets = tokenizer.encode_rendered(text)
        if labels_everything(loss_mask):
            return {"input_ids": ids, "labels": list(ids)}
        context = {i for i, m in enumerate(msgs) if not is_trained(m)}
        trained = set(trained_replies([m["role"] for m in msgs], loss_mask, trained_from, context))
        labels = [IGNORE_INDEX] * len(ids)
        token = 0
        variants = lambda i, whole: self._sentinel_renders(msgs, i, tokenizer, whole)  # noqa: E731
        for reply in locate_replies(text, msgs, markers, self.name, variants):
            if reply.message not in trained:
                continue
            self._check_reasoning_kept(msgs, reply.message, text[reply.start:reply.end])
            body, eot, tail = self._reply_tokens(text, ids, offsets, reply, markers, tokenizer, token)
            positions = [*body, eot, *tail]
            segment = reply_labels([ids[t] for t in body], [ids[eot]], [ids[t] for t in tail], loss_mask)
            try:
                check_reply_target(reply.start == reply.end, segment, loss_mask)
            except ValueError as e:
                raise ValueError(f"message {reply.message}: {e}") from None
            for t, label in zip(positions, segment):
                if label != IGNORE_INDEX:
                    labels[t] = ids[t]
            token = eot + 1
        return {"input_ids": ids, "labels": labels}

    def _check_reasoning_kept(self, msgs: list[Message], i: int, reply: str) -> None:
        """A final reply's `reasoning_content` that the template never reads is lost: warn once.

        (Templates that drop reasoning from earlier turns do so by design; QwQ and
        DeepSeek-R1's templates read only inline `<think>` in content.)
        """
        reasoning = msgs[i].get("reasoning_content", "").strip()
        last = max(k for k, m in enumerate(msgs) if m["role"] == "assistant")
        if reasoning and i == last and reasoning not in reply and not self._warned_reasoning:
            log.warning(
                "message %d: chat template %r does not render this reply's reasoning_content, so it is not "
                "trained; write the reasoning inline as <think>...</think> at the start of content (warned once)",
                i, self.name,
            )
            self._warned_reasoning = True

    @staticmethod
    def _reply_tokens(
        text: str, ids: list[int], offsets: list[tuple[int, int]], reply: ReplySpan, markers: Markers,
        tokenizer: Tokenizer, token: int,
    ) -> tuple[list[int], int, list[int]]:
        """Token positions of one reply from `token` on: its body (tokens overlapping its span), its
        end-of-turn token, and the whitespace tokens after it (what `legacy_minimind` labels)."""
        while token < len(ids) and offsets[token][1] <= reply.start and offsets[token][0] < reply.end:
            token += 1
        body = []
        while token < len(ids) and offsets[token][0] < reply.end:
            body.append(token)
            token += 1
        if token == len(ids) or ids[token] not in tokenizer.special_ids or offsets[token][0] != reply.end:
            raise ValueError(
                f"message {reply.message}: the end-of-turn marker after this reply "
                f"(e.g. {markers.eot!r}) is not a token of its own in the tokenised rendering"
            )
        tail = []
        nxt = token + 1
        while nxt < len(ids) and ids[nxt] not in tokenizer.special_ids and not text[slice(*offsets[nxt])].strip():
            tail.append(nxt)
            nxt += 1
        return body, token, tail

    def encode(
        self, messages: Sequence[Message], tokenizer: Tokenizer, loss_mask: str = "assistant"
    ) -> dict[str, list[int]]:
        """`{"input_ids", "labels"}` of a whole conversation (labels unshifted)."""
        check_loss_mask(loss_mask)
        out = self._encode_full(_messages(messages), tokenizer, loss_mask)
        require_targets(out["labels"], loss_mask)
        return out

    def encode_prompt(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
        """The conversation so far rendered with the template's generation prompt."""
        text = self._checked_render(_messages(messages), tokenizer, add_generation_prompt=True)
        return tokenizer.encode_rendered(text)[0]

    def encode_pair(
        self, prompt: Sequence[Message], completions: Mapping[str, Sequence[Message]], tokenizer: Tokenizer
    ) -> tuple[list[int], dict[str, dict[str, list[int]]]]:
        """A shared prompt and, per completion, the tokens after it with its replies labelled.

        Each side is rendered whole (prompt + completion); the prompt is the
        longest token prefix the sides share that holds no target, so the
        completion's header (and inserted scaffolding) is context.
        """
        context = _messages(prompt)
        full = {}
        for side, messages in completions.items():
            try:
                whole = Conversation([*context, *_messages(messages)], tools=tools_of(context))
                full[side] = self._encode_full(whole, tokenizer, "assistant", len(context))
            except ValueError as e:
                raise ValueError(f"{side}: {e}") from None
            require_targets(full[side]["labels"], "assistant")
        sides = list(full.values())
        split = min(next(i for i, t in enumerate(s["labels"]) if t != IGNORE_INDEX) for s in sides)
        first = sides[0]["input_ids"]
        for s in sides[1:]:
            same = next((i for i, (a, b) in enumerate(zip(first, s["input_ids"])) if a != b), min(len(first), len(s["input_ids"])))
            split = min(split, same)
        replies = {side: {"input_ids": s["input_ids"][split:], "labels": s["labels"][split:]} for side, s in full.items()}
        return first[:split], replies

    def encode_reply(
        self,
        content: str,
        tokenizer: Tokenizer,
        loss_mask: str = "assistant",
        *,
        prompt: Sequence[Message] | None = None,
    ) -> dict[str, list[int]]:
        """One reply's tokens from its start (header and scaffolding excluded) to the end of the rendering.

        The rendering depends on context, so the reply is rendered after
        `prompt` (default: one placeholder user turn). `encode_prompt(p) +
        encode_reply(c, prompt=p)` equals `encode(p + [c])` only where the
        template is prefix-stable at the generation prompt (not QwQ or
        DeepSeek-R1, whose generation prompt opens a `<think>`); `encode_pair`
        does not rely on it.
        """
        check_loss_mask(loss_mask)
        if not isinstance(content, str):
            raise ValueError(f"reply content must be a str, got {type(content).__name__}")
        context = _messages(prompt) if prompt is not None else [{"role": "user", "content": _PROBE_USER}]
        msgs = Conversation([*context, {"role": "assistant", "content": content}], tools=tools_of(context))
        markers = self._markers_of(tokenizer)
        full = self._encode_full(msgs, tokenizer, loss_mask, len(context))
        text = self._checked_render(msgs, tokenizer, add_generation_prompt=False)
        variants = lambda i, whole: self._sentinel_renders(msgs, i, tokenizer, whole)  # noqa: E731
        reply = locate_replies(text, msgs, markers, self.name, variants)[-1]
        _, offsets = tokenizer.encode_rendered(text)
        start = next(i for i, (a, b) in enumerate(offsets) if b > reply.start or a >= reply.end)
        out = {"input_ids": full["input_ids"][start:], "labels": full["labels"][start:]}
        require_targets(out["labels"], loss_mask)
        return out
