"""Chat messages: the roles and the `Message` type, defined once for readers and templates.

Design choices:

- A message is plain data (a `TypedDict`), so records read from files
  (`data/formats.py`) go to templates without conversion. `role` and
  `content` always; optional fields follow the OpenAI / `transformers`
  conventions chat templates read: `reasoning_content` (an assistant's
  reasoning, also accepted inline as `<think>…</think>` at the start of
  `content`), `tool_calls` (assistant; `[{"type": "function", "function":
  {"name", "arguments": {...}}}]`, arguments an object), `tool_call_id` and
  `name` (tool results), and `weight` (0: the reply is context, not a target;
  1, the default, trains it: OpenAI's fine-tuning convention).
- Four roles: system, user, assistant, tool. File formats map their own names
  onto them (`formats`: ShareGPT's `function_call` is an assistant turn with
  `tool_calls`, `observation` a `tool` message).
- The tool schemas belong to the conversation, not to a message: a
  `Conversation` is a `list` of messages that also carries `tools`, so every
  place that takes a list of messages keeps working, and `tools_of` reads the
  schemas of any list (None for a plain one).
- `validate_messages` is the templates' check (a list of dicts with a known
  role and string content), raising `ValueError` naming the message index.
  The readers' stricter record rules (turn order, empty replies, JSON
  arguments) live in `formats`, where the file, line and field can be named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NotRequired, TypedDict, get_args

__all__ = [
    "OPTIONAL_FIELDS",
    "ROLES",
    "Conversation",
    "Message",
    "Role",
    "is_trained",
    "tools_of",
    "validate_messages",
]

Role = Literal["system", "user", "assistant", "tool"]

#: The roles, in the order templates list them.
ROLES: tuple[str, ...] = get_args(Role)


class Message(TypedDict):
    role: Role
    content: str
    reasoning_content: NotRequired[str]
    tool_calls: NotRequired[list[dict[str, Any]]]
    tool_call_id: NotRequired[str]
    name: NotRequired[str]
    weight: NotRequired[int]


#: The optional keys a message may carry (everything else is refused).
OPTIONAL_FIELDS: tuple[str, ...] = ("reasoning_content", "tool_calls", "tool_call_id", "name", "weight")


class Conversation(list):
    """A list of messages plus the conversation's tool schemas (`tools`, None when it has none)."""

    def __init__(self, messages: Sequence[Message] = (), tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(messages)
        self.tools = tools

    def __reduce__(self) -> tuple[Any, ...]:
        return (Conversation, (list(self), self.tools))

    def __eq__(self, other: object) -> bool:
        # Against a plain list only the messages compare, as a list compares with a Conversation.
        same = list.__eq__(self, other)
        return same if not isinstance(other, Conversation) or same is NotImplemented else same and other.tools == self.tools

    __hash__ = None  # type: ignore[assignment]


def tools_of(messages: Sequence[Message]) -> list[dict[str, Any]] | None:
    """The tool schemas a conversation carries (None for a plain list)."""
    return getattr(messages, "tools", None)


def is_trained(message: Mapping[str, Any]) -> bool:
    """Whether an assistant message is a target (`weight` absent or 1) rather than context (`weight: 0`)."""
    return message.get("weight", 1) != 0


def validate_messages(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """`(role, content)` of each message; a `ValueError` naming the first bad one."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a str, got {type(content).__name__}")
        extra = sorted(set(m) - {"role", "content", *OPTIONAL_FIELDS})
        if extra:
            raise ValueError(f"message {i}: unknown field(s) {', '.join(extra)}")
        weight = m.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise ValueError(f"message {i}: weight must be 0 or 1, got {weight!r}")
        out.append((role, content))
    return out
