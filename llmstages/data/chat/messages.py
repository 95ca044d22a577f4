"""Chat messages: the roles and the `Message` type, defined once for readers and templates.

Design choices:

- A message is plain data, `{"role", "content"}` (a `TypedDict`), so records
  read from files (`data/formats.py`) go to templates without conversion.
- Three roles: system, user, assistant. File formats map their own names onto
  them (`formats`: ShareGPT's `function_call` is an assistant turn,
  `observation` a user turn); templates accept only these.
- `validate_messages` is the templates' check (a list of dicts with a known
  role and string content), raising `ValueError` naming the message index.
  The readers' stricter record rules (turn order, empty replies) live in
  `formats`, where the file, line and field can be named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, TypedDict, get_args

__all__ = ["ROLES", "Message", "Role", "validate_messages"]

Role = Literal["system", "user", "assistant"]

#: The roles, in the order templates list them.
ROLES: tuple[str, ...] = get_args(Role)


class Message(TypedDict):
    role: Role
    content: str


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
        out.append((role, content))
    return out
