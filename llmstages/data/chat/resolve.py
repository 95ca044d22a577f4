"""`resolve_template`: a `template:` name -> the `Template` a data module or tool uses.

Named layouts come from `named.py`'s registry; `auto`/`hf` render the
tokenizer's own Jinja `chat_template` (`jinja.py`). This is the only module
that knows both, so neither imports the other.
"""

from __future__ import annotations

from typing import Any

from llmstages.data.chat.jinja import HFChatTemplate
from llmstages.data.chat.named import ChatTemplate
from llmstages.data.chat.protocol import Template
from llmstages.data.tokenizer import Tokenizer
from llmstages.options import TemplateName, choices

__all__ = ["DEFAULT_TEMPLATE", "TEMPLATE_NAMES", "resolve_template"]

#: Names `template:` accepts: the named layouts plus the model's own Jinja template.
TEMPLATE_NAMES: tuple[str, ...] = choices(TemplateName)
DEFAULT_TEMPLATE = "chatml"


def resolve_template(name: str, tokenizer: Tokenizer, **options: Any) -> Template:
    """The template a data module uses: a named `ChatTemplate`, or for `auto`/`hf`
    the tokenizer's own Jinja `chat_template` (`HFChatTemplate`; `options` go to it:
    `date_string`, `dropped_system`, `template_kwargs`)."""
    if name in ("auto", "hf"):
        if tokenizer.chat_template is None:
            raise ValueError(
                f"template: {name} renders the model's own chat template, but this tokenizer has none "
                "(no chat_template in tokenizer_config.json, no chat_template.jinja); set template to "
                f"one of {', '.join(ChatTemplate.names())}, or use a tokenizer folder that has a template"
            )
        return HFChatTemplate(tokenizer.chat_template, name=name, **options)
    if options:
        raise ValueError(f"template {name!r} takes no options, got {sorted(options)}")
    if name not in ChatTemplate.names():
        raise ValueError(f"unknown chat template {name!r}; available: {', '.join(TEMPLATE_NAMES)}")
    return ChatTemplate.get(name)
