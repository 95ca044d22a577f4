"""What every chat template implements: the named layouts (`named.ChatTemplate`) and the
model's own Jinja template (`jinja.HFChatTemplate`) alike.

Design choices:

- A `Protocol`, not a base class: the two implementations share no code
  besides the loss-mask rules (`loss_mask.py`) and message validation
  (`messages.py`), which they call as functions. `resolve_template` returns a
  `Template`; data modules, stages and tools use only these members.
- Every `encode*` returns unshifted labels (`IGNORE_INDEX` where no loss);
  a result with no labelled token is an error, never a silent zero mask.
- A conversation's tool schemas travel with its messages (`messages.Conversation`,
  a list with `tools`), so these signatures take tool-calling conversations
  unchanged: the Jinja template passes them as `tools=`, a named layout refuses them.
- `encode_reply` takes the reply's context as `prompt` because a Jinja
  template's rendering of a reply may depend on it; a named layout's does
  not, and ignores it after validating it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from llmstages.data.chat.messages import Message
from llmstages.data.tokenizer import Tokenizer

__all__ = ["Encoded", "Template"]

#: `{"input_ids": [...], "labels": [...]}`, labels unshifted.
Encoded = dict[str, list[int]]


@runtime_checkable
class Template(Protocol):
    """A chat template: conversations in, token ids and loss-mask labels out."""

    name: str

    @property
    def jinja(self) -> str:
        """The template as Jinja source (an exported model's `chat_template`)."""
        ...

    def stop_token_id(self, tokenizer: Tokenizer) -> int:
        """The end-of-turn id: written after every reply, and what generation stops on."""
        ...

    def encode(self, messages: Sequence[Message], tokenizer: Tokenizer, loss_mask: str = "assistant") -> Encoded:
        """A whole conversation, its replies labelled by `loss_mask`."""
        ...

    def encode_prompt(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
        """The conversation so far followed by the assistant header (a generation prompt)."""
        ...

    def encode_reply(
        self,
        content: str,
        tokenizer: Tokenizer,
        loss_mask: str = "assistant",
        *,
        prompt: Sequence[Message] | None = None,
    ) -> Encoded:
        """One assistant reply as it follows `prompt`'s generation prompt: content, end-of-turn, separator."""
        ...

    def encode_pair(
        self, prompt: Sequence[Message], completions: Mapping[str, Sequence[Message]], tokenizer: Tokenizer
    ) -> tuple[list[int], dict[str, Encoded]]:
        """A shared prompt's ids and, per completion (chosen/rejected), the tokens after it, replies labelled."""
        ...

    def render(
        self,
        messages: Sequence[Message],
        tokenizer: Tokenizer | None = None,
        *,
        add_generation_prompt: bool = False,
        eos_token: str | None = None,
    ) -> str:
        """The conversation as text; special tokens from `tokenizer`, or `eos_token` alone."""
        ...
