"""The chat layer's shape: one `Template` protocol both kinds of template implement, and a
`data/` package without import cycles or private names shared across modules.

The signatures are compared with the protocol's own (`inspect`), so a template that grows or
renames a parameter fails here instead of at a caller that passes it by keyword. The import
checks read the source (`ast`), so they hold for imports inside functions too.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from llmstages.data.chat import ChatTemplate, HFChatTemplate, Template, resolve_template
from llmstages.data.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[1] / "llmstages" / "data"
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MEMBERS = ["stop_token_id", "encode", "encode_prompt", "encode_reply", "encode_pair", "render"]


def _templates() -> list[object]:
    return [*(ChatTemplate.get(name) for name in ChatTemplate.names()), HFChatTemplate(CHATML_JINJA)]


@pytest.mark.parametrize("template", _templates(), ids=lambda t: t.name)
def test_every_template_implements_the_protocol_with_its_signatures(template) -> None:
    assert isinstance(template, Template)
    for member in MEMBERS:
        expected = inspect.signature(getattr(Template, member))
        actual = inspect.signature(getattr(type(template), member))
        assert [(p.name, p.kind, p.default) for p in actual.parameters.values()] == [
            (p.name, p.kind, p.default) for p in expected.parameters.values()
        ], member
    assert isinstance(template.jinja, str) and template.jinja


def test_a_named_reply_is_the_same_after_any_prompt(cache: Path) -> None:
    """`prompt=` is part of the shared `encode_reply`; a named layout's reply does not depend on it."""
    from llmstages.data.base import default_tokenizer

    tok: Tokenizer = default_tokenizer(cache)
    chatml = resolve_template("chatml", tok)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chatml.encode_reply("Hello!", tok, prompt=prompt) == chatml.encode_reply("Hello!", tok)
    with pytest.raises(ValueError, match="unknown role"):
        chatml.encode_reply("Hello!", tok, prompt=[{"role": "function", "content": "x"}])
    with pytest.raises(ValueError, match="no format for a tool message"):
        chatml.encode_reply("Hello!", tok, prompt=[{"role": "tool", "content": "x"}])


def _imports(path: Path) -> list[ast.ImportFrom]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("llmstages")]


def _module_name(path: Path) -> str:
    parts = path.relative_to(DATA.parents[1]).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_private_name_is_imported_across_data_modules() -> None:
    shared = [
        f"{_module_name(path)} imports {alias.name} from {node.module}"
        for path in DATA.rglob("*.py")
        for node in _imports(path)
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert shared == []


def test_data_modules_import_each_other_without_cycles() -> None:
    modules = {_module_name(p): p for p in DATA.rglob("*.py")}
    graph = {
        name: {n.module for n in _imports(path) if n.module in modules and not name.startswith(n.module + ".")}
        for name, path in modules.items()
    }
    # a package's __init__ re-exports its children; a child importing its own package is the only allowed loop
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail[trail.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_loss_mask_rules_written_out() -> None:
    """Each variant's labels of one reply (content 1 2, end-of-turn 9, newline 5), by hand."""
    from llmstages.data.chat.loss_mask import LOSS_MASKS, reply_labels, trained_replies
    from llmstages.losses import IGNORE_INDEX as I

    expected = {
        "assistant": [1, 2, 9, I],
        "last_assistant": [1, 2, 9, I],
        "assistant_no_eos": [1, 2, I, I],
        "legacy_drop_first": [I, 2, 9, I],
        "legacy_minimind": [1, 2, 9, 5],
        "all": [1, 2, 9, 5],
    }
    assert sorted(expected) == sorted(LOSS_MASKS)
    assert {mask: reply_labels([1, 2], [9], [5], mask) for mask in LOSS_MASKS} == expected
    roles = ["system", "user", "assistant", "user", "assistant"]
    assert trained_replies(roles, "assistant") == [2, 4]
    assert trained_replies(roles, "last_assistant") == [4]
    assert trained_replies(roles, "assistant", first=3) == [4]
    with pytest.raises(ValueError, match="unknown loss_mask 'nope'"):
        reply_labels([1], [9], [], "nope")
