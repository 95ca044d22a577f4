"""The chat layer: messages -> token ids + loss-mask labels.

| file | holds |
|---|---|
| `messages.py` | the roles, the `Message` type (reasoning, tool calls, weight), `Conversation` (messages + tools), `validate_messages` |
| `protocol.py` | `Template`: what every chat template implements |
| `loss_mask.py` | which tokens carry a loss (every `loss_mask` variant), for every template |
| `named.py` | the named layouts (`chatml`, `llama3`, `plain`): `ChatTemplate` |
| `jinja.py` | the model's own Jinja template (`auto`/`hf`): `HFChatTemplate` |
| `spans.py` | where each reply sits in a Jinja rendering (character spans) |
| `resolve.py` | `resolve_template`: a `template:` name -> a `Template` |

Imports go one way: `named` and `jinja` import `messages` and `loss_mask`
(and `jinja` imports `spans`), never each other; `resolve` imports both.
"""

from llmstages.data.chat.jinja import DEFAULT_DATE_STRING, HFChatTemplate
from llmstages.data.chat.loss_mask import LOSS_MASKS, reply_labels
from llmstages.data.chat.messages import ROLES, Conversation, Message, Role, tools_of, validate_messages
from llmstages.data.chat.named import ChatTemplate
from llmstages.data.chat.protocol import Template
from llmstages.data.chat.resolve import DEFAULT_TEMPLATE, TEMPLATE_NAMES, resolve_template

__all__ = [
    "DEFAULT_DATE_STRING",
    "DEFAULT_TEMPLATE",
    "LOSS_MASKS",
    "ROLES",
    "TEMPLATE_NAMES",
    "ChatTemplate",
    "Conversation",
    "HFChatTemplate",
    "Message",
    "Role",
    "Template",
    "reply_labels",
    "resolve_template",
    "tools_of",
    "validate_messages",
]
