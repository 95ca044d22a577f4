"""Named chat layouts (`chatml`, `llama3`, `plain`): messages -> ids + labels, segment by segment.

Design choices:

- No Jinja. A template is data: an optional conversation prefix, a header per
  role, the end-of-turn marker and the separator after each message. Each
  segment (header, content, end-of-turn token, separator) is tokenised on its
  own, so the prompt/reply boundary is exact in token space and the mask is
  built from the segments themselves, never from a side channel (TRL #4879,
  #6105). Content is encoded with `Tokenizer.encode`, so a marker string
  written inside a message stays text; markers are emitted only here, looked
  up with `token_to_id` (a missing one is an error naming it).
- Which tokens carry a loss is decided in `loss_mask.py`; this file only
  says where each reply's content, end-of-turn token and separator are.
- Templates: `chatml` (default), `llama3` (no newline after `<|eot_id|>`, so
  `legacy_minimind` labels exactly what `assistant` does there), and `plain`
  (no markers: "User: ...\\n\\n", "Assistant: ...<eos>\\n\\n", "System: ...\\n\\n";
  the end-of-turn token is the tokenizer's EOS, after assistant replies only).
- The model's own Jinja template (`template: auto` or `hf`) lives in
  `jinja.py`; both implement `protocol.Template`, and `resolve.py` picks one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from llmstages.data.chat.loss_mask import (
    check_loss_mask,
    check_reply_target,
    labels_everything,
    reply_labels,
    require_targets,
    trained_replies,
)
from llmstages.data.chat.messages import Message, tools_of, validate_messages
from llmstages.data.tokenizer import (
    BEGIN_OF_TEXT,
    END_HEADER,
    EOS_TOKEN,
    EOT_ID,
    IM_END,
    IM_START,
    START_HEADER,
    Tokenizer,
)
from llmstages.losses import IGNORE_INDEX

__all__ = ["ChatTemplate", "Piece", "Special"]

#: The roles a named layout writes; tool calls and results need the model's own template.
NAMED_ROLES = ("system", "user", "assistant")


def _plain(messages: Sequence[Message], template: str) -> list[tuple[str, str]]:
    """`(role, content)` of messages a named layout can write; reasoning and tool parts are refused."""
    msgs = validate_messages(messages)
    if tools_of(messages):
        raise ValueError(
            f"chat template {template!r} has no format for tool schemas; use template: auto "
            "(the model's own chat template renders tools)"
        )
    for i, m in enumerate(messages):
        part = next((k for k in ("tool_calls", "reasoning_content") if m.get(k)), None)
        if m["role"] == "tool" or part is not None:
            what = "a tool message" if part is None else repr(part)
            hint = (
                "; or write the reasoning inline as <think>...</think> at the start of content (a named "
                "template trains it as text)" if part == "reasoning_content" else ""
            )
            raise ValueError(
                f"message {i}: chat template {template!r} has no format for {what}; use template: auto "
                f"(the model's own chat template){hint}"
            )
    return msgs


def _context(messages: Sequence[Message]) -> set[int]:
    """Indices of the messages with `weight: 0` (context, not targets)."""
    return {i for i, m in enumerate(messages) if m.get("weight", 1) == 0}


@dataclass(frozen=True)
class Special:
    """A marker emitted as its single special id."""

    token: str


Piece = str | Special


@dataclass(frozen=True)
class ChatTemplate:
    """One named chat layout (a `protocol.Template`). Get the built-in ones with `ChatTemplate.get(name)`.

    `eot` is the end-of-turn marker (None: the tokenizer's EOS); it follows the
    messages of the roles in `eot_roles`, and `separator` follows every message.
    """

    name: str
    headers: tuple[tuple[str, tuple[Piece, ...]], ...]
    eot: str | None
    eot_roles: frozenset[str]
    separator: str
    prefix: tuple[Piece, ...] = ()
    description: str = ""

    _registry: ClassVar[dict[str, ChatTemplate]] = {}

    # ----------------------------------------------------------- registry
    @classmethod
    def register(cls, template: ChatTemplate) -> ChatTemplate:
        cls._registry[template.name] = template
        return template

    @classmethod
    def get(cls, name: str) -> ChatTemplate:
        try:
            return cls._registry[name]
        except KeyError:
            raise ValueError(
                f"unknown chat template {name!r}; available: {', '.join(cls.names())}"
            ) from None

    @classmethod
    def names(cls) -> list[str]:
        return sorted(cls._registry)

    # ----------------------------------------------------------- pieces
    def _header(self, role: str) -> tuple[Piece, ...]:
        return dict(self.headers)[role]

    def _special_id(self, token: str, tokenizer: Tokenizer) -> int:
        i = tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(
                f"chat template {self.name!r} needs the special token {token!r}, "
                "which this tokenizer lacks"
            )
        return i

    def _ids(self, pieces: Sequence[Piece], tokenizer: Tokenizer) -> list[int]:
        out: list[int] = []
        for p in pieces:
            if isinstance(p, Special):
                out.append(self._special_id(p.token, tokenizer))
            elif p:
                out.extend(tokenizer.encode(p))
        return out

    def stop_token_id(self, tokenizer: Tokenizer) -> int:
        """The end-of-turn id that generation stops on."""
        return tokenizer.eos_id if self.eot is None else self._special_id(self.eot, tokenizer)

    # ----------------------------------------------------------- encoding
    def _message(
        self,
        role: str,
        content: str,
        tokenizer: Tokenizer,
        loss_mask: str,
        trained: bool,
        with_header: bool,
    ) -> tuple[list[int], list[int]]:
        """ids and labels of one message; `trained` marks a reply the mask trains on."""
        header = self._ids(self._header(role), tokenizer) if with_header else []
        body = tokenizer.encode(content)
        eot = [self.stop_token_id(tokenizer)] if role in self.eot_roles else []
        sep = tokenizer.encode(self.separator) if self.separator else []
        ids = header + body + eot + sep

        if labels_everything(loss_mask):
            return ids, list(ids)
        if not trained:
            return ids, [IGNORE_INDEX] * len(ids)
        target = reply_labels(body, eot, sep, loss_mask)
        check_reply_target(not content, target[: len(body) + len(eot)], loss_mask)
        return ids, [IGNORE_INDEX] * len(header) + target

    def encode(
        self, messages: Sequence[Message], tokenizer: Tokenizer, loss_mask: str = "assistant"
    ) -> dict[str, list[int]]:
        """`{"input_ids", "labels"}` of a whole conversation (labels unshifted)."""
        check_loss_mask(loss_mask)
        msgs = _plain(messages, self.name)
        trained = set(trained_replies([role for role, _ in msgs], loss_mask, context=_context(messages)))
        ids = self._ids(self.prefix, tokenizer)
        labels = list(ids) if labels_everything(loss_mask) else [IGNORE_INDEX] * len(ids)
        for i, (role, content) in enumerate(msgs):
            try:
                m_ids, m_labels = self._message(role, content, tokenizer, loss_mask, i in trained, True)
            except ValueError as e:
                raise ValueError(f"message {i}: {e}") from None
            ids += m_ids
            labels += m_labels
        require_targets(labels, loss_mask)
        return {"input_ids": ids, "labels": labels}

    def encode_prompt(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
        """The conversation so far followed by the assistant header (generation prompt)."""
        msgs = _plain(messages, self.name)
        ids = self._ids(self.prefix, tokenizer)
        for role, content in msgs:
            ids += self._message(role, content, tokenizer, "assistant", False, True)[0]
        return ids + self._ids(self._header("assistant"), tokenizer)

    def encode_reply(
        self,
        content: str,
        tokenizer: Tokenizer,
        loss_mask: str = "assistant",
        *,
        prompt: Sequence[Message] | None = None,
    ) -> dict[str, list[int]]:
        """One assistant reply after `encode_prompt`: content, end-of-turn, separator.

        `encode_prompt(msgs[:-1]) + encode_reply(msgs[-1]["content"])` equals
        `encode(msgs)` when the last message is the assistant's. The segments
        do not depend on the context, so `prompt` is only validated.
        """
        check_loss_mask(loss_mask)
        if prompt is not None:
            _plain(prompt, self.name)
        if not isinstance(content, str):
            raise ValueError(f"reply content must be a str, got {type(content).__name__}")
        ids, labels = self._message("assistant", content, tokenizer, loss_mask, True, False)
        require_targets(labels, loss_mask)
        return {"input_ids": ids, "labels": labels}

    def encode_pair(
        self, prompt: Sequence[Message], completions: Mapping[str, Sequence[Message]], tokenizer: Tokenizer
    ) -> tuple[list[int], dict[str, dict[str, list[int]]]]:
        """The prompt's ids and, per completion (e.g. chosen/rejected), the tokens after it.

        A one-message completion is `encode_reply` of its content; a longer one
        is the whole conversation's tail, its assistant turns labelled (the
        prompt's own turns stay context).
        """
        prompt_ids = self.encode_prompt(prompt, tokenizer)
        out = {}
        for side, messages in completions.items():
            if len(messages) == 1:
                out[side] = self.encode_reply(messages[0]["content"], tokenizer)
            else:
                full = self.encode([*prompt, *messages], tokenizer, loss_mask="assistant")
                n = len(prompt_ids)
                out[side] = {"input_ids": full["input_ids"][n:], "labels": full["labels"][n:]}
        return prompt_ids, out

    @property
    def jinja(self) -> str:
        """This layout as a Jinja chat template (for an exported model's
        `chat_template`): rendered like `transformers` does, it writes exactly
        `render`'s text, with the tokenizer's `eos_token` where `eot` is None."""

        def literal(pieces: Sequence[Piece]) -> str:
            text = "".join(p.token if isinstance(p, Special) else p for p in pieces)
            return "{{ " + json.dumps(text) + " }}" if text else ""

        eot = "{{ eos_token }}" if self.eot is None else literal((self.eot,))
        roles = "[" + ", ".join(json.dumps(r) for r in sorted(self.eot_roles)) + "]"
        branches = "".join(
            ("{% if " if k == 0 else "{% elif ") + f"message['role'] == {json.dumps(role)} %}}" + literal(header)
            for k, (role, header) in enumerate(self.headers)
        )
        return (
            literal(self.prefix)
            + "{% for message in messages %}"
            + branches
            + "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
            + "{{ message['content'] }}"
            + f"{{% if message['role'] in {roles} %}}{eot}{{% endif %}}"
            + literal((self.separator,))
            + "{% endfor %}"
            + "{% if add_generation_prompt %}" + literal(self._header("assistant")) + "{% endif %}"
        )

    def render(
        self,
        messages: Sequence[Message],
        tokenizer: Tokenizer | None = None,
        *,
        add_generation_prompt: bool = False,
        eos_token: str | None = None,
    ) -> str:
        """The conversation as text (for previews); tokenising it whole may differ from `encode`.

        `eos_token` is the text shown for the tokenizer's EOS (`plain` template):
        given, else `tokenizer`'s, else the default tokenizer's.
        """
        msgs = _plain(messages, self.name)
        if eos_token is None:
            eos_token = tokenizer.eos_token if tokenizer is not None else EOS_TOKEN

        def text(pieces: Sequence[Piece]) -> str:
            return "".join(p.token if isinstance(p, Special) else p for p in pieces)

        eot = eos_token if self.eot is None else self.eot
        out = [text(self.prefix)]
        for role, content in msgs:
            out += [text(self._header(role)), content]
            out += [eot if role in self.eot_roles else "", self.separator]
        if add_generation_prompt:
            out.append(text(self._header("assistant")))
        return "".join(out)


ALL_ROLES = frozenset(NAMED_ROLES)

ChatTemplate.register(
    ChatTemplate(
        name="chatml",
        headers=tuple((r, (Special(IM_START), f"{r}\n")) for r in NAMED_ROLES),
        eot=IM_END,
        eot_roles=ALL_ROLES,
        separator="\n",
        description="<|im_start|>{role}\\n{content}<|im_end|>\\n",
    )
)
ChatTemplate.register(
    ChatTemplate(
        name="llama3",
        prefix=(Special(BEGIN_OF_TEXT),),
        headers=tuple((r, (Special(START_HEADER), r, Special(END_HEADER), "\n\n")) for r in NAMED_ROLES),
        eot=EOT_ID,
        eot_roles=ALL_ROLES,
        separator="",
        description="<|begin_of_text|> then <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>",
    )
)
ChatTemplate.register(
    ChatTemplate(
        name="plain",
        headers=(("system", ("System: ",)), ("user", ("User: ",)), ("assistant", ("Assistant: ",))),
        eot=None,
        eot_roles=frozenset({"assistant"}),
        separator="\n\n",
        description="User: {content}\\n\\nAssistant: {content}<eos>\\n\\n",
    )
)
