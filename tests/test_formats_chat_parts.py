"""Chat records as people have them: tool calls, tool results, tool schemas, reasoning, content parts,
per-message weights, and fields no reader uses. Each bad input names file, line and field, or is counted
under on_error: skip."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from llmstages.data.chat.messages import tools_of
from llmstages.data.formats import DataFormatError, read_chat, read_preference, read_prompts

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def jsonl(tmp_path: Path, rows: list[Any]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def call(arguments: Any = None, name: str = "get_weather") -> dict:
    return {"id": "call00001", "type": "function", "function": {"name": name, "arguments": arguments or {"city": "Oslo"}}}


def tool_record(**changes: Any) -> dict:
    rec = {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call()]},
            {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "call00001", "name": "get_weather"},
            {"role": "assistant", "content": "3 degrees."},
        ],
    }
    rec.update(changes)
    return rec


def test_openai_tool_record_reads_into_template_messages(tmp_path: Path) -> None:
    rec = tool_record()
    rec["messages"][1]["tool_calls"] = [call('{"city": "Oslo"}'), call({"city": "Bergen"})]  # a JSON string or an object
    (conv,), report = read_chat(jsonl(tmp_path, [rec]))
    assert tools_of(conv) == [WEATHER] and report.ignored == Counter()
    assert conv[1] == {"role": "assistant", "content": "", "tool_calls": [call({"city": "Oslo"}), call({"city": "Bergen"})]}
    assert conv[2] == {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "call00001", "name": "get_weather"}
    # tools stored as a JSON string (as datasets often do); bare schemas are wrapped as function tools
    (conv,), _ = read_chat(jsonl(tmp_path, [tool_record(tools=json.dumps([WEATHER["function"]]))]))
    assert tools_of(conv) == [WEATHER]


@pytest.mark.parametrize(
    "change,reason,field",
    [
        (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{city: Oslo"), "invalid_json",
         "messages[1].tool_calls[0].function.arguments"),
        (lambda r: r["messages"].pop(1), "orphan_tool_result", "messages[1].role"),
        (lambda r: r.update(tools=[{"type": "function", "function": {"parameters": {}}}]), "missing_field", "tools[0].function.name"),
        (lambda r: r["messages"][0].update(content="<think>hmm</think> what?"), "reasoning_marker", "messages[0].content"),
        (lambda r: r["messages"][0].update(content=[{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "x"}}]),
         "unsupported_part", "messages[0].content[1].type"),
        (lambda r: r["messages"][3].update(weight=0.5), "wrong_type", "messages[3].weight"),
        (lambda r: r["messages"][3].update(note="x"), "unknown_field", "messages[3].note"),
    ],
    ids=["bad_arguments", "orphan_tool", "tool_without_name", "think_in_user", "image_part", "weight", "unknown_field"],
)
def test_bad_tool_and_reasoning_input_names_line_and_field(tmp_path: Path, change, reason: str, field: str) -> None:
    bad = tool_record()
    change(bad)
    path = jsonl(tmp_path, [tool_record(), bad])
    with pytest.raises(DataFormatError) as info:
        read_chat(path)
    err = info.value
    assert (err.reason, err.field, err.index) == (reason, field, 2), str(err)
    assert f"data.jsonl:2: field {field!r}" in str(err)
    convs, report = read_chat(path, on_error="skip")
    if reason == "unknown_field":  # skip mode: the record is kept and the field named in the report
        assert len(convs) == 2 and report.ignored == Counter({"messages[].note": 1})
        assert "ignored fields: messages[].note (1)" in report.summary()
    else:
        assert len(convs) == 1 and report.skipped == Counter({reason: 1})


def test_content_parts_and_weights_in_every_chat_format(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there."}]
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                        {"role": "assistant", "content": parts, "weight": 0},
                        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello.", "weight": 1}]}
    (conv,), _ = read_chat(jsonl(tmp_path, [rec]))
    assert conv == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there.", "weight": 0},
                    {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello.", "weight": 1}]
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo", "weight": 0},
                                  {"from": "human", "value": "Again"}, {"from": "gpt", "value": "Hello."}]}
    (conv,), _ = read_chat(jsonl(tmp_path, [sharegpt]))
    assert conv[1] == {"role": "assistant", "content": "Yo", "weight": 0}
    all_context = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo", "weight": 0}]}
    with pytest.raises(DataFormatError, match="no target: every assistant turn has weight 0"):
        read_chat(jsonl(tmp_path, [all_context]))


def test_real_llamafactory_v1_typed_parts(shared_data: Path) -> None:
    """LLaMA-Factory v1: `{"type", "value"}` parts (text, reasoning, tool_call), per-message `loss_weight`, tools as a string."""
    path = shared_data / "llamafactory" / "reason_tool_use_demo_50.jsonl"
    convs, report = read_chat(path)
    assert len(convs) == 50 and report.ignored == Counter()
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    for conv, rec in zip(convs, raw):
        expected = [t if "function" in t else {"type": "function", "function": t} for t in json.loads(rec["tools"])]
        assert tools_of(conv) == (expected or None)
        for m, source in zip(conv, rec["messages"]):
            kinds = [p["type"] for p in source["content"]]
            assert m["content"] == "".join(p["value"] for p in source["content"] if p["type"] == "text")
            assert ("reasoning_content" in m) == ("reasoning" in kinds)
            assert len(m.get("tool_calls", [])) == kinds.count("tool_call")
    sft, report = read_chat(shared_data / "llamafactory" / "v1_sft_demo.jsonl")
    assert report.ignored == Counter() and all(m.get("weight", 1) == 1 for c in sft for m in c if m["role"] == "assistant")


def test_prompts_and_preferences_read_the_same_records(tmp_path: Path) -> None:
    (prompt,), _ = read_prompts(jsonl(tmp_path, [tool_record()]))
    assert tools_of(prompt["messages"]) == [WEATHER] and prompt["answer"] == "3 degrees."
    assert [m["role"] for m in prompt["messages"]] == ["user", "assistant", "tool"]  # up to the final reply
    pair = {"prompt": tool_record()["messages"][:3], "tools": [WEATHER],
            "chosen": "3 degrees.", "rejected": "Sunny!"}
    with pytest.raises(DataFormatError, match="prompt_not_user|prompt does not end with a user turn"):
        read_preference(jsonl(tmp_path, [pair]))
    pair["prompt"] = pair["prompt"][:1]
    pair["chosen"] = tool_record()["messages"][1:]
    (read,), _ = read_preference(jsonl(tmp_path, [pair]))
    assert tools_of(read["prompt"]) == [WEATHER] and read["chosen"][0]["tool_calls"] == [call()]


def test_real_llamafactory_v1_preference_pairs(shared_data: Path) -> None:
    """`chosen_messages`/`rejected_messages`: the turns both share are the prompt, the rest each side."""
    path = shared_data / "llamafactory" / "v1_dpo_demo.jsonl"
    pairs, report = read_preference(path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(pairs) == len(raw) == report.kept and report.ignored == Counter()

    def text(m: dict) -> str:
        return "".join(p["value"] for p in m["content"])

    for pair, rec in zip(pairs, raw):
        chosen, rejected = rec["chosen_messages"], rec["rejected_messages"]
        n = next(k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b)
        assert [(m["role"], m["content"]) for m in pair["prompt"]] == [(m["role"], text(m)) for m in chosen[:n]]
        assert [m["content"] for m in pair["chosen"]] == [text(m) for m in chosen[n:]]
        assert [m["content"] for m in pair["rejected"]] == [text(m) for m in rejected[n:]]
