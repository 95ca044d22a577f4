"""The parts of a chat message beyond role and text: content parts, reasoning, tool calls, tool schemas, weights.

Design choices:

- Everything becomes what `transformers` chat templates read (`chat.messages.Message`):
  text parts join into `content`, reasoning parts into `reasoning_content`,
  tool calls into `[{"type": "function", "function": {"name", "arguments": {...}}}]`
  (plus `id`), tool schemas into `{"type": "function", "function": {...}}`.
- JSON stored as a string (a call, its `arguments`, a `tools` list: common in
  exported datasets and LLaMA-Factory) is parsed, so every template renders the
  same object and invalid JSON is an error naming the field, not a string a
  template would quote.
- A part that is not text (image, audio) is an error naming it and its type:
  a text-only model would otherwise train on the words around a missing picture.
- Weights are 0 (context) or 1 (trained): OpenAI's `weight`, LLaMA-Factory v1's `loss_weight`.
"""

from __future__ import annotations

from typing import Any

from llmstages.data.record_fields import Invalid, json_value, req_str, unused, wrong_type

__all__ = ["REASONING_MARKERS", "content_parts", "message_weight", "read_tools", "tool_call"]

#: The inline reasoning markers (Qwen3, QwQ, DeepSeek-R1 distills, SmolLM3).
REASONING_MARKERS = ("<think>", "</think>")
_TEXT_PART_KEYS = ("text", "value")  # OpenAI's {"type": "text", "text"}, LLaMA-Factory v1's {"type", "value"}


def content_parts(value: Any, field: str, role: str) -> tuple[str, dict[str, Any]]:
    """A message's content: a string, or a list of typed parts (OpenAI `{"type": "text", "text"}`,
    LLaMA-Factory v1 `{"type": "text" | "reasoning" | "tool_call", "value"}`). Text parts are joined;
    reasoning and tool-call parts become `reasoning_content` and `tool_calls`; any other part is an error."""
    if isinstance(value, str):
        return value, {}
    if not isinstance(value, list):
        raise wrong_type(field, "a string or an array of content parts", value)
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[Any] = []
    for j, part in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(part, dict):
            raise wrong_type(where, "a content part object", part)
        kind = part.get("type")
        key = next((k for k in _TEXT_PART_KEYS if k in part), None)
        if kind not in ("text", "reasoning", "tool_call") or key is None:
            raise Invalid(
                "unsupported_part", f"{where}.type",
                f"a {kind!r} part; only text (and an assistant's reasoning/tool_call) parts can be trained",
            )
        unused(part, ("type", key), where)
        text = part[key]
        if not isinstance(text, str):
            raise wrong_type(f"{where}.{key}", "string", text)
        if kind != "text" and role != "assistant":
            raise Invalid("unsupported_part", f"{where}.type", f"a {kind} part in a {role} message")
        if kind == "tool_call":
            calls.append(tool_call(text, f"{where}.{key}"))
        elif kind == "reasoning":
            reasoning.append(text)
        else:
            texts.append(text)
    extra: dict[str, Any] = {}
    if reasoning:
        extra["reasoning_content"] = "\n".join(reasoning)
    if calls:
        extra["tool_calls"] = calls
    return "".join(texts), extra


def tool_call(value: Any, field: str) -> dict[str, Any]:
    """One call as templates read it: `{"type": "function", "function": {"name", "arguments": {...}}}`
    (plus `id` when given). Bare `{"name", "arguments"}` (LLaMA-Factory) is accepted; `arguments`
    given as a JSON string is parsed, so every template renders the same object."""
    value = json_value(value, field)
    if not isinstance(value, dict):
        raise wrong_type(field, "a tool call object", value)
    function = value.get("function", value)
    fbase = f"{field}.function" if "function" in value else field
    if "function" in value:
        unused(value, ("function", "type", "id"), field)
    if not isinstance(function, dict):
        raise wrong_type(fbase, "an object with name and arguments", function)
    unused(function, ("name", "arguments") if function is not value else ("name", "arguments", "type", "id"), fbase)
    name = req_str(function, "name", f"{fbase}.name")
    if not name.strip():
        raise Invalid("missing_field", f"{fbase}.name", "empty tool name")
    arguments = json_value(function.get("arguments", {}), f"{fbase}.arguments")
    if not isinstance(arguments, dict):
        raise wrong_type(f"{fbase}.arguments", "an object (or a JSON string of one)", arguments)
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if "id" in value:
        call["id"] = req_str(value, "id", f"{field}.id")
    return call


def read_tools(rec: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A record's `tools`: function schemas (a list, or a JSON string of one, as datasets store it),
    each as `{"type": "function", "function": {"name", ...}}`; bare `{"name", ...}` schemas are wrapped."""
    if "tools" not in rec or rec["tools"] in (None, "", []):
        return None
    tools = json_value(rec["tools"], "tools")
    if not isinstance(tools, list):
        raise wrong_type("tools", "an array of function schemas (or a JSON string of one)", tools)
    out = []
    for k, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise wrong_type(f"tools[{k}]", "a function schema object", tool)
        if tool.get("type", "function") != "function":
            raise Invalid("unsupported_tool", f"tools[{k}].type", f"a {tool['type']!r} tool; chat templates render function tools")
        function = tool.get("function", tool)
        where = f"tools[{k}].function" if "function" in tool else f"tools[{k}]"
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
            raise Invalid("missing_field", f"{where}.name", "a tool schema needs a function name")
        out.append({"type": "function", "function": function})
    return out


def message_weight(item: dict[str, Any], base: str) -> int | None:
    """`weight` (OpenAI fine-tuning) or `loss_weight` (LLaMA-Factory v1): 0 (context) or 1 (target)."""
    key = next((k for k in ("weight", "loss_weight") if k in item), None)
    if key is None:
        return None
    value = item[key]
    if isinstance(value, bool) or value not in (0, 1):
        raise Invalid("wrong_type", f"{base}.{key}", f"expected 0 (context) or 1 (trained), got {value!r}")
    return int(value)
