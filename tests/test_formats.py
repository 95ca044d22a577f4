"""Dataset readers: real LLaMA-Factory files read cleanly; every bad input is named exactly."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from llmstages.data.chat.messages import tools_of
from llmstages.data.formats import (
    DataFormatError,
    LoadReport,
    read_chat,
    read_preference,
    read_text,
)

# --------------------------------------------------------------------------- helpers


def jsonl(tmp_path: Path, rows: list[Any], name: str = "data.jsonl") -> Path:
    """Write rows as JSONL; str rows are written verbatim (for broken lines)."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def json_array(tmp_path: Path, rows: list[Any], name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def sg(*turns: tuple[str, str], **extra: Any) -> dict[str, Any]:
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def msgs(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD_SG = sg(("human", "hi"), ("gpt", "hello"))
GPT_Y = {"from": "gpt", "value": "y"}


def raises(fn, *args: Any, **kw: Any) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        fn(*args, **kw)
    return info.value


# --------------------------------------------------------------------------- real data


@pytest.mark.parametrize(
    "name, count, fmt",
    [
        ("alpaca_en_demo.json", 999, "alpaca"),
        ("alpaca_zh_demo.json", 1000, "alpaca"),
        ("identity.json", 91, "alpaca"),
        ("glaive_toolcall_en_demo.json", 300, "sharegpt"),
    ],
)
def test_real_chat_files_read_cleanly(shared_data: Path, name: str, count: int, fmt: str) -> None:
    convs, report = read_chat(shared_data / "llamafactory" / name)
    assert len(convs) == count == report.kept
    assert report.skipped == Counter() and report.format == fmt
    assert report.summary() == f"{name}: kept {count}, skipped 0"
    for conv in convs:
        assert conv[-1]["role"] == "assistant" and conv[-1]["content"].strip()


def test_a_field_no_reader_uses_is_an_error_or_named_in_the_report(shared_data: Path) -> None:
    """KTO's `label` says whether a reply is desirable: read as SFT data, dropping it would train the bad ones."""
    path = shared_data / "llamafactory" / "kto_en_demo.json"
    with pytest.raises(DataFormatError, match=r"record 0 \(0-based\): field 'label': unknown field"):
        read_chat(path)
    convs, report = read_chat(path, on_error="skip")
    assert len(convs) == report.kept == 300 and report.ignored == Counter({"label": 300})
    assert report.summary() == "kto_en_demo.json: kept 300, skipped 0; ignored fields: label (300)"


def test_real_alpaca_exact_content(shared_data: Path) -> None:
    path = shared_data / "llamafactory" / "alpaca_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    convs, _ = read_chat(path)
    assert convs[0] == [
        {"role": "user", "content": "Describe a process of making crepes."},
        {"role": "assistant", "content": raw[0]["output"]},
    ]
    assert convs[0][1]["content"].startswith("Making crepes is an easy and delicious process!")
    i = next(k for k, r in enumerate(raw) if r["input"])  # a record with an input joins it with "\n"
    assert convs[i][0] == {"role": "user", "content": raw[i]["instruction"] + "\n" + raw[i]["input"]}


def test_real_identity_keeps_placeholders(shared_data: Path) -> None:
    convs, _ = read_chat(shared_data / "llamafactory" / "identity.json")
    assert convs[0] == [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "Hello! I am {{name}}, an AI assistant developed by {{author}}. How can I assist you today?",
        },
    ]


def test_real_glaive_tool_calls_and_tools_are_carried(shared_data: Path) -> None:
    path = shared_data / "llamafactory" / "glaive_toolcall_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    convs, report = read_chat(path)
    assert report.ignored == Counter()  # `tools` is used, not dropped
    assert [t["from"] for t in raw[0]["conversations"]][2:6] == ["human", "function_call", "observation", "gpt"]
    assert [m["role"] for m in convs[0]][2:6] == ["user", "assistant", "tool", "assistant"]
    expected = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
    for conv, rec in zip(convs, raw):
        assert [m["role"] for m in conv] == [expected[t["from"]] for t in rec["conversations"]]
        # Every record's schemas travel with it, as OpenAI-style function tools.
        schemas = json.loads(rec["tools"]) if rec["tools"] else []
        assert tools_of(conv) == ([{"type": "function", "function": t} for t in schemas] or None)
        for m, t in zip(conv, rec["conversations"]):
            if t["from"] == "function_call":  # the call, parsed: the template renders it in its own format
                call = json.loads(t["value"])
                assert m["content"] == "" and m["tool_calls"] == [
                    {"type": "function", "function": {"name": call["name"], "arguments": json.loads(call["arguments"])
                                                      if isinstance(call["arguments"], str) else call["arguments"]}}
                ]
            else:
                assert m["content"] == t["value"] and "tool_calls" not in m


@pytest.mark.parametrize("name", ["dpo_en_demo.json", "dpo_zh_demo.json"])
def test_real_preference_files_read_cleanly(shared_data: Path, name: str) -> None:
    path = shared_data / "llamafactory" / name
    raw = json.loads(path.read_text(encoding="utf-8"))
    pairs, report = read_preference(path)
    assert len(pairs) == report.kept == 300 and not report.skipped
    for pair, rec in zip(pairs, raw):
        assert pair["prompt"][-1]["role"] == "user"
        assert pair["chosen"] == [{"role": "assistant", "content": rec["chosen"]["value"]}]
        assert pair["rejected"] == [{"role": "assistant", "content": rec["rejected"]["value"]}]
    k = next(k for k, r in enumerate(raw) if r["conversations"][0]["from"] == "system")
    assert pairs[k]["prompt"][0] == {"role": "system", "content": raw[k]["conversations"][0]["value"]}


def test_real_dpo_exact_content(shared_data: Path) -> None:
    pairs, _ = read_preference(shared_data / "llamafactory" / "dpo_en_demo.json")
    assert pairs[0]["prompt"] == [
        {
            "role": "user",
            "content": "Hi! I'd like to create a new language game simulating the first person "
            "perspective of a character named Angela.",
        }
    ]
    assert pairs[0]["chosen"][0]["content"].startswith("That sounds like a fun and engaging idea!")
    multi = [p for p in pairs if len(p["prompt"]) > 1]
    assert multi and all(p["prompt"][1]["role"] == "assistant" for p in multi if p["prompt"][0]["role"] == "user")


def test_real_text_files(shared_data: Path) -> None:
    base = shared_data / "llamafactory"
    docs, report = read_text(base / "c4_demo.jsonl")
    assert len(docs) == report.kept == 300
    first = json.loads((base / "c4_demo.jsonl").read_text(encoding="utf-8").split("\n")[0])["text"]
    assert docs[0] == first and docs[0].startswith("Don’t think you need all the bells and whistles?")

    lines, report = read_text(base / "wiki_demo.txt")
    assert len(lines) == report.kept == 30
    assert lines[0].startswith("Anarchism is a political philosophy and movement")
    assert not any("\n" in line for line in lines)

    whole, _ = read_text(base / "wiki_demo.txt", mode="file")
    assert whole == [(base / "wiki_demo.txt").read_text(encoding="utf-8")]


def test_real_preference_file_is_not_chat(shared_data: Path) -> None:
    err = raises(read_chat, shared_data / "llamafactory" / "dpo_en_demo.json")
    assert (err.reason, err.index, err.index_kind) == ("format_mismatch", 0, "record")
    assert "read_preference" in str(err)


# --------------------------------------------------------------------------- bad input, one case each


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [GOOD_SG, GOOD_SG, '{"conversations": [', GOOD_SG])
    err = raises(read_chat, path)
    assert (err.path, err.index, err.reason, err.field) == (path, 3, "invalid_json", None)
    assert str(err).startswith(f"{path}:3: invalid JSON")


def test_missing_field(tmp_path: Path) -> None:
    err = raises(read_chat, jsonl(tmp_path, [{"instruction": "hi", "input": ""}]))
    assert (err.reason, err.field, err.index) == ("missing_field", "output", 1)


def test_mistyped_field(tmp_path: Path) -> None:
    err = raises(read_chat, jsonl(tmp_path, [GOOD_SG, sg(("human", "hi"), ("gpt", 42))]))
    assert (err.reason, err.field, err.index) == ("wrong_type", "conversations[1].value", 2)
    assert "expected a string or an array of content parts, got number" in str(err)


def test_record_not_an_object(tmp_path: Path) -> None:
    err = raises(read_chat, jsonl(tmp_path, [GOOD_SG, ["human", "hi"]]))
    assert (err.reason, err.field, err.index) == ("wrong_type", None, 2)


def test_empty_reply_message_format(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [sg(("human", "hi"), ("gpt", " \n\t"))])
    err = raises(read_chat, path)
    assert str(err) == f"{path}:1: field 'conversations[1].value': empty reply"
    assert err.reason == "empty_reply"


def test_empty_alpaca_output(tmp_path: Path) -> None:
    path = json_array(tmp_path, [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""}])
    err = raises(read_chat, path)
    assert (err.reason, err.field, err.index, err.index_kind) == ("empty_reply", "output", 1, "record")
    assert "record 1 (0-based)" in str(err)


def test_unknown_role(tmp_path: Path) -> None:
    err = raises(read_chat, jsonl(tmp_path, [sg(("bot", "hi"), ("gpt", "hello"))]))
    assert (err.reason, err.field) == ("unknown_role", "conversations[0].from")
    assert "'bot'" in str(err)


def test_unknown_role_in_messages_format(tmp_path: Path) -> None:
    err = raises(read_chat, jsonl(tmp_path, [msgs(("user", "hi"), ("function", "{}"), ("assistant", "ok"))]))
    assert (err.reason, err.field) == ("unknown_role", "messages[1].role")


def test_two_assistants_in_a_row(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [msgs(("user", "hi"), ("assistant", "a"), ("assistant", "b"))])
    err = raises(read_chat, path)
    assert (err.reason, err.field) == ("consecutive_assistant", "messages[2].role")


def test_two_users_in_a_row(tmp_path: Path) -> None:
    err = raises(read_chat, jsonl(tmp_path, [sg(("human", "a"), ("human", "b"), ("gpt", "c"))]))
    assert (err.reason, err.field) == ("consecutive_user", "conversations[1].from")


def test_system_only_first(tmp_path: Path) -> None:
    err = raises(read_chat, jsonl(tmp_path, [sg(("human", "a"), ("system", "b"), ("gpt", "c"))]))
    assert (err.reason, err.field) == ("misplaced_system", "conversations[1].from")
    # a top-level system prompt makes an in-conversation one a second system turn
    err = raises(read_chat, jsonl(tmp_path, [sg(("system", "b"), ("human", "a"), ("gpt", "c"), system="s")]))
    assert (err.reason, err.field) == ("misplaced_system", "conversations[0].from")


def test_no_assistant_turn(tmp_path: Path) -> None:
    err = raises(read_chat, jsonl(tmp_path, [sg(("system", "s"), ("human", "a"))]))
    assert (err.reason, err.field) == ("no_assistant", None)


def test_empty_user_turn(tmp_path: Path) -> None:
    err = raises(read_chat, jsonl(tmp_path, [{"instruction": " ", "input": "", "output": "x"}]))
    assert (err.reason, err.field) == ("empty_message", "instruction")


@pytest.mark.parametrize("name, line", [("data.jsonl", 2), ("data.txt", 4)])
def test_non_utf8_names_line(tmp_path: Path, name: str, line: int) -> None:
    rows = [json.dumps(GOOD_SG).encode()] * 5
    rows[line - 1] = b'{"text": "caf\xe9"}'
    path = tmp_path / name
    path.write_bytes(b"\n".join(rows) + b"\n")
    reader = read_chat if name.endswith(".jsonl") else read_text
    err = raises(reader, path)
    assert (err.path, err.index, err.reason) == (path, line, "not_utf8")
    assert str(err).startswith(f"{path}:{line}: not valid UTF-8: byte 0xe9 at byte column 14")


def test_non_utf8_in_json_array_names_line_in_both_modes(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_bytes(b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "\xff", "output": "b"}\n]')
    for mode in ("raise", "skip"):
        err = raises(read_chat, path, on_error=mode)
        assert (err.index, err.index_kind, err.reason) == (3, "line", "not_utf8")


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n\n"),
        ("empty.json", ""),
        ("empty_array.json", "[]"),
    ],
)
def test_empty_file_is_empty_dataset(tmp_path: Path, on_error: str, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    err = raises(read_chat, path, on_error=on_error)
    assert (err.reason, err.path, err.index) == ("empty_dataset", path, None)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_empty_text_file_is_empty_dataset(tmp_path: Path, on_error: str) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("\n \n", encoding="utf-8")
    for mode in ("line", "file"):
        assert raises(read_text, path, mode=mode, on_error=on_error).reason == "empty_dataset"


def test_all_bad_file_is_empty_dataset_in_both_modes(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [sg(("human", "a"), ("gpt", "")), "not json"])
    assert raises(read_chat, path).reason == "empty_reply"  # raise mode stops at the first bad one
    err = raises(read_chat, path, on_error="skip")
    assert err.reason == "empty_dataset"
    assert "skipped 2 (empty_reply: 1, invalid_json: 1)" in str(err)  # the cause is in the message


@pytest.mark.parametrize("reader", [read_chat, read_preference, read_text])
def test_bad_on_error_value(tmp_path: Path, reader: Any) -> None:
    with pytest.raises(ValueError, match="on_error"):
        reader(jsonl(tmp_path, [GOOD_SG]), on_error="ignore")


def test_bad_format_and_mode_values(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [GOOD_SG])
    with pytest.raises(ValueError, match="format"):
        read_chat(path, format="chatml")
    with pytest.raises(ValueError, match="mode"):
        read_text(path, mode="paragraph")
    with pytest.raises(ValueError, match="plain .txt"):
        read_text(path, mode="file")


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n", encoding="utf-8")
    assert raises(read_chat, path).reason == "unsupported_extension"
    assert raises(read_text, path).reason == "unsupported_extension"


def test_invalid_json_array_raises_in_skip_mode(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n{"instruction": ]', encoding="utf-8")
    err = raises(read_chat, path, on_error="skip")
    assert (err.reason, err.index, err.index_kind) == ("invalid_json", 2, "line")


def test_jsonl_named_json_gets_a_hint(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [GOOD_SG, GOOD_SG], name="data.json")
    err = raises(read_chat, path)
    assert err.reason == "invalid_json" and ".jsonl" in str(err)


def test_json_top_level_must_be_array(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(GOOD_SG), encoding="utf-8")
    assert raises(read_chat, path, on_error="skip").reason == "wrong_type"


# --------------------------------------------------------------------------- skip mode


def test_skip_mode_counts_reasons_and_keeps_order(tmp_path: Path) -> None:
    rows: list[Any] = [
        sg(("human", "q1"), ("gpt", "a1")),
        sg(("human", "q2"), ("gpt", "  ")),  # empty_reply
        "{broken",  # invalid_json
        "",  # blank: not a record, not counted
        sg(("human", "q3"), ("gpt", "a3")),
        sg(("bot", "q4"), ("gpt", "a4")),  # unknown_role
        sg(("human", "q5"), ("gpt", "")),  # empty_reply
        {"instruction": "q6", "output": "a6"},  # format_mismatch: alpaca in a sharegpt file
        sg(("human", "q7"), ("gpt", "a7")),
    ]
    path = jsonl(tmp_path, rows)
    convs, report = read_chat(path, on_error="skip")
    assert [c[0]["content"] for c in convs] == ["q1", "q3", "q7"]
    assert report.kept == 3 and report.format == "sharegpt"
    assert report.skipped == Counter(empty_reply=2, invalid_json=1, unknown_role=1, format_mismatch=1)
    assert report.summary() == (
        "data.jsonl: kept 3, skipped 5 (empty_reply: 2, format_mismatch: 1, invalid_json: 1, unknown_role: 1)"
    )
    assert report.first_errors[:2] == [
        f"{path}:2: field 'conversations[1].value': empty reply",
        f"{path}:3: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
    ]
    assert len(report.first_errors) == LoadReport.MAX_ERRORS


def test_skip_mode_text_records(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [{"text": "a"}, {"text": " "}, {"body": "b"}, {"text": 3}, {"text": "c"}])
    docs, report = read_text(path, on_error="skip")
    assert docs == ["a", "c"]
    assert report.skipped == Counter(empty_text=1, missing_field=1, wrong_type=1)
    docs, _ = read_text(jsonl(tmp_path, [{"body": "b"}], name="b.jsonl"), field="body")
    assert docs == ["b"]


def test_summary_format() -> None:
    report = LoadReport(path=Path("data/train.jsonl"), kept=998, skipped=Counter(unknown_role=1, empty_reply=1))
    assert report.summary() == "train.jsonl: kept 998, skipped 2 (empty_reply: 1, unknown_role: 1)"
    assert report.num_skipped == 2


# --------------------------------------------------------------------------- format details


def test_auto_detects_from_first_usable_record(tmp_path: Path) -> None:
    path = jsonl(tmp_path, [{"foo": 1}, msgs(("user", "hi"), ("assistant", "yo")), GOOD_SG])
    assert raises(read_chat, path).reason == "unknown_format"
    convs, report = read_chat(path, on_error="skip")
    assert report.format == "messages" and len(convs) == 1
    assert report.skipped == Counter(unknown_format=1, format_mismatch=1)
    # an explicit format never guesses
    convs, report = read_chat(path, format="sharegpt", on_error="skip")
    assert convs == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    assert report.skipped == Counter(missing_field=1, format_mismatch=1)


def test_ambiguous_record(tmp_path: Path) -> None:
    rec = {**GOOD_SG, **msgs(("user", "a"), ("assistant", "b"))}
    assert raises(read_chat, jsonl(tmp_path, [rec])).reason == "ambiguous_format"


def test_alpaca_system_history_and_input(tmp_path: Path) -> None:
    rec = {
        "system": "be brief",
        "history": [["h1", "r1"], ["h2", "r2"]],
        "instruction": "translate",
        "input": "bonjour",
        "output": "hello",
    }
    convs, _ = read_chat(jsonl(tmp_path, [rec, {"instruction": "x", "input": "", "output": "y", "system": ""}]))
    assert convs[0] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "h1"},
        {"role": "assistant", "content": "r1"},
        {"role": "user", "content": "h2"},
        {"role": "assistant", "content": "r2"},
        {"role": "user", "content": "translate\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    assert convs[1] == [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]  # empty system dropped


def test_alpaca_bad_history(tmp_path: Path) -> None:
    err = raises(read_chat, jsonl(tmp_path, [{"instruction": "a", "output": "b", "history": [["h", " "]]}]))
    assert (err.reason, err.field) == ("empty_reply", "history[0][1]")
    err = raises(read_chat, jsonl(tmp_path, [{"instruction": "a", "output": "b", "history": [["h"]]}]))
    assert (err.reason, err.field) == ("wrong_type", "history[0]")


def test_sharegpt_aliases_tools_and_top_level_system(tmp_path: Path) -> None:
    rec = sg(
        ("user", "weather?"),
        ("function_call", '{"name": "w", "arguments": "{\\"city\\": \\"Oslo\\"}"}'),
        ("observation", '{"t": 3}'),
        ("assistant", "3 degrees"),
        system="sys",
        tools='[{"name": "w", "parameters": {"type": "object"}}]',
    )
    convs, _ = read_chat(jsonl(tmp_path, [rec]))
    assert convs[0] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": '{"t": 3}'},
        {"role": "assistant", "content": "3 degrees"},
    ]
    assert convs[0].tools == [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]


def test_content_is_verbatim_and_crlf_bom_handled(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    line = json.dumps(sg(("human", "  spaced  "), ("gpt", "ok\n")))
    path.write_bytes(b"\xef\xbb\xbf" + line.encode() + b"\r\n\r\n" + line.encode() + b"\r\n")
    convs, report = read_chat(path)
    assert report.kept == 2 and convs[0][0]["content"] == "  spaced  " and convs[0][1]["content"] == "ok\n"
    txt = tmp_path / "docs.txt"
    txt.write_bytes(b"\xef\xbb\xbfone\r\n\r\ntwo\n")
    assert read_text(txt)[0] == ["one", "two"]


# --------------------------------------------------------------------------- preference


def test_preference_string_and_message_list_shapes(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {
            "prompt": [{"role": "system", "content": "math"}, {"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": {"role": "assistant", "content": "5"},
        },
    ]
    pairs, report = read_preference(jsonl(tmp_path, rows))
    assert report.kept == 2
    assert pairs[0] == {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    assert pairs[1]["prompt"][0] == {"role": "system", "content": "math"}
    assert pairs[1]["rejected"] == [{"role": "assistant", "content": "5"}]


def test_preference_identical_pair(tmp_path: Path) -> None:
    rows = [{"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "a", "rejected": "b"}]
    path = jsonl(tmp_path, rows)
    err = raises(read_preference, path)
    assert (err.reason, err.index) == ("identical_pair", 1)
    pairs, report = read_preference(path, on_error="skip")
    assert len(pairs) == 1 and report.skipped == Counter(identical_pair=1)


def test_preference_prompt_must_end_with_user(tmp_path: Path) -> None:
    rec = {**sg(("human", "q"), ("gpt", "a")), "chosen": {"from": "gpt", "value": "x"}, "rejected": GPT_Y}
    err = raises(read_preference, jsonl(tmp_path, [rec]))
    assert (err.reason, err.field) == ("prompt_not_user", "conversations[1].from")


def test_preference_chosen_checks(tmp_path: Path) -> None:
    base = sg(("human", "q"))
    err = raises(read_preference, jsonl(tmp_path, [{**base, "chosen": {"from": "gpt", "value": " "}, "rejected": GPT_Y}]))
    assert (err.reason, err.field) == ("empty_reply", "chosen.value")
    err = raises(read_preference, jsonl(tmp_path, [{**base, "chosen": {"from": "human", "value": "x"}, "rejected": GPT_Y}]))
    assert (err.reason, err.field) == ("wrong_role", "chosen.from")
    err = raises(read_preference, jsonl(tmp_path, [{**base, "chosen": {"from": "gpt", "value": "x"}}]))
    assert (err.reason, err.field) == ("missing_field", "rejected")
    err = raises(read_preference, jsonl(tmp_path, [{"prompt": "q", "chosen": "x", "rejected": 1}]))
    assert (err.reason, err.field) == ("wrong_type", "rejected")


def test_preference_without_prompt(tmp_path: Path) -> None:
    err = raises(read_preference, jsonl(tmp_path, [{"chosen": "x", "rejected": "y"}]))
    assert (err.reason, err.field) == ("missing_field", "prompt")


# --------------------------------------------------------------------------- the error object


def test_error_pickles_and_is_a_value_error() -> None:
    err = DataFormatError("data/x.json", 4, "output", "empty_reply", index_kind="record")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ValueError)
    assert (back.path, back.index, back.field, back.reason, back.index_kind) == (
        Path("data/x.json"), 4, "output", "empty_reply", "record",
    )
    assert str(back) == str(err) == "data/x.json: record 4 (0-based): field 'output': empty reply"


def test_iter_text_streams_lazily_and_reports_at_the_end(tmp_path):
    """Pretraining corpora larger than memory are read line by line: the first document comes
    out before a bad byte further down the file is even read."""
    from llmstages.data.formats import iter_text

    path = tmp_path / "corpus.txt"
    path.write_bytes(b"first doc\nsecond doc\n\xff\xfe broken\nlast\n")
    stream = iter_text(path)
    docs = iter(stream)
    assert next(docs) == "first doc" and next(docs) == "second doc"
    with pytest.raises(DataFormatError) as info:
        next(docs)
    assert info.value.index == 3 and info.value.reason == "not_utf8"

    skipping = iter_text(path, on_error="skip")
    assert list(skipping) == ["first doc", "second doc", "last"]
    assert skipping.report.kept == 3 and skipping.report.skipped["not_utf8"] == 1


# --------------------------------------------------------------------------- prompts


def test_prompt_lines_read_text_files_and_mixed_jsonl_rows(tmp_path: Path) -> None:
    """`lines` is what `llmstages generate --prompts` reads: a text line is a user prompt;
    a `.jsonl` row holds `messages` (a final assistant turn is the reference answer) or `prompt`."""
    from llmstages.data.formats import read_prompts

    text = tmp_path / "p.txt"
    text.write_text("hello there\n\n  \n the fox? \n", encoding="utf-8")
    records, report = read_prompts(text, format="lines")
    assert [(r["messages"], r["text"], r["answer"]) for r in records] == [
        ([{"role": "user", "content": "hello there"}], "hello there", None),
        ([{"role": "user", "content": " the fox? "}], " the fox? ", None),
    ]
    assert (report.kept, report.format) == (2, "lines")

    conversation = [("system", "be brief"), ("user", "hi"), ("assistant", "hello")]
    rows = jsonl(tmp_path, [msgs(*conversation), {"prompt": "add 1 and 2."}, msgs(("user", "only"))])
    records, _ = read_prompts(rows, format="lines")
    assert [(r["messages"], r["answer"], r["text"]) for r in records] == [
        (msgs(*conversation)["messages"][:2], "hello", None),
        ([{"role": "user", "content": "add 1 and 2."}], None, "add 1 and 2."),
        ([{"role": "user", "content": "only"}], None, None),
    ]


def test_prompt_lines_errors_name_the_line_and_follow_on_error(tmp_path: Path) -> None:
    from llmstages.data.formats import read_prompts

    rows = jsonl(tmp_path, [{"prompt": "ok"}, {"text": "no prompt"}, msgs(("assistant", "a"))])
    err = raises(read_prompts, rows, format="lines")
    assert (err.index, err.reason) == (2, "no_prompt")
    assert str(err).endswith("data.jsonl:2: expected an object with 'messages' (a list) or 'prompt' (a str)")
    records, report = read_prompts(rows, format="lines", on_error="skip")
    assert [r["text"] for r in records] == ["ok"]
    assert report.skipped == Counter({"no_prompt": 1, "prompt_not_user": 1})


def test_prompt_records_and_auto_detection(tmp_path: Path) -> None:
    """`auto` reads `{"prompt", "answer"}` records when the first record has `prompt`, else
    chat conversations cut before their final reply (the reply is the answer)."""
    from llmstages.data.formats import read_prompts

    records_file = jsonl(tmp_path, [{"prompt": "2+2?", "answer": "4", "task": "add", "system": "s"},
                                    {"prompt": [{"role": "user", "content": "hi"}]}], name="r.jsonl")
    records, _ = read_prompts(records_file)
    assert records == [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}],
         "answer": "4", "task": "add", "text": None},
        {"messages": [{"role": "user", "content": "hi"}], "answer": None, "task": None, "text": None},
    ]
    chat_file = jsonl(tmp_path, [sg(("human", "say cat."), ("gpt", "cat"))], name="c.jsonl")
    records, report = read_prompts(chat_file)
    assert report.format == "sharegpt"
    assert [(r["messages"], r["answer"]) for r in records] == [([{"role": "user", "content": "say cat."}], "cat")]
    bad = jsonl(tmp_path, [{"prompt": "ok"}, {"prompt": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}]}], name="b.jsonl")
    err = raises(read_prompts, bad)
    assert (err.index, err.field, err.reason) == (2, "prompt[1].role", "prompt_not_user")
