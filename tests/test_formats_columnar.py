"""Columnar inputs: a Parquet file and a `datasets.save_to_disk` folder give the same records, the same
encoded examples and the same errors (file, row, field) as the JSON form of the same data."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import torch

from llmstages.data import PreferenceData, PretrainData, SFTData
from llmstages.data.base import default_tokenizer
from llmstages.data.chat import resolve_template
from llmstages.data.chat.messages import tools_of
from llmstages.data.columnar import rows as columnar_rows
from llmstages.data.formats import DataFormatError, iter_text, read_chat, read_preference, read_prompts, read_text
from llmstages.data.tokenizer import Tokenizer


@pytest.fixture
def lf(shared_data: Path) -> Path:
    return shared_data / "llamafactory"

SEQ = 128
LONG = 2048  # most of the real files' examples whole

# --------------------------------------------------------------------------- writers


def table(records: list[dict[str, Any]]) -> pa.Table:
    """Records as one Arrow table, the schema inferred from every record (as `datasets` and pandas do):
    a key some records lack is a null in the others."""
    return pa.Table.from_struct_array(pa.array(records))


def write_parquet(records: list[dict[str, Any]], path: Path, row_group_size: int | None = None) -> Path:
    pq.write_table(table(records), path, row_group_size=row_group_size)
    return path


def write_saved_dataset(records: list[dict[str, Any]], folder: Path, shards: int = 2) -> Path:
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC stream shards named in `state.json`,
    beside `dataset_info.json`."""
    folder.mkdir()
    whole = table(records)
    size = -(-len(records) // shards)
    names = [f"data-{k:05d}-of-{shards:05d}.arrow" for k in range(shards)]
    for k, name in enumerate(names):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, whole.schema) as writer:
            writer.write_table(whole.slice(k * size, size), max_chunksize=3)  # several batches per shard
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0" * 16, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    return folder


def write_jsonl(records: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def three_forms(records: list[dict[str, Any]], tmp_path: Path) -> list[Path]:
    return [write_jsonl(records, tmp_path / "data.jsonl"), write_parquet(records, tmp_path / "data.parquet", 2),
            write_saved_dataset(records, tmp_path / "saved")]


def with_tools(conversations: list[Any]) -> list[tuple[Any, Any]]:
    """Conversations compared with their tool schemas (a `Conversation` carries them beside the list)."""
    return [(list(c), tools_of(c)) for c in conversations]


def raises(fn, *args: Any, **kw: Any) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        fn(*args, **kw)
    return info.value


# --------------------------------------------------------------------------- the same records


CHAT_RECORDS = [  # mixed keys: a system prompt in one record, tool calls, weights, a tool result
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"system": "be brief", "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is sunny.", "reasoning_content": "the tool said so"},
    ], "tools": [{"type": "function", "function": {"name": "weather", "description": "look it up"}}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "weight": 1}]},
]
ALPACA_RECORDS = [
    {"instruction": "Add", "input": "1 and 2", "output": "3"},
    {"instruction": "Greet", "output": "hello", "system": "kind",
     "history": [["hi", "hey"], ["how are you", "fine"]]},
]
SHAREGPT_RECORDS = [
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    {"conversations": [{"from": "human", "value": "find x"},
                       {"from": "function_call", "value": '{"name": "find", "arguments": {"q": "x"}}'},
                       {"from": "observation", "value": "found"}, {"from": "gpt", "value": "x is here"}],
     "tools": '[{"name": "find", "parameters": {"type": "object"}}]'},
]
PREFERENCE_RECORDS = [
    {"prompt": [{"role": "user", "content": "q1"}], "chosen": [{"role": "assistant", "content": "good"}],
     "rejected": [{"role": "assistant", "content": "bad"}]},
    {"prompt": [{"role": "user", "content": "q2"}], "chosen": [{"role": "assistant", "content": "yes"}],
     "rejected": [{"role": "assistant", "content": "no"}], "system": "s"},
]


@pytest.mark.parametrize("records, fmt", [(CHAT_RECORDS, "messages"), (ALPACA_RECORDS, "alpaca"),
                                          (SHAREGPT_RECORDS, "sharegpt")])
def test_chat_formats_read_the_same_from_every_form(tmp_path: Path, records: list, fmt: str) -> None:
    (a, ra), (b, rb), (c, rc) = (read_chat(p) for p in three_forms(records, tmp_path))
    assert with_tools(a) == with_tools(b) == with_tools(c)
    assert len(a) == len(records)
    assert ra.format == rb.format == rc.format == fmt


def test_nested_nulls_are_absent_keys_not_values(tmp_path: Path) -> None:
    # One schema for both rows: each call's `arguments` struct holds `city` and `day`, a user message a
    # null `tool_calls`. Read back, every object has only the keys its JSON record wrote.
    other = {"messages": [
        {"role": "user", "content": "w"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"day": "mon"}}}]},
        {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "rain"}]}
    conversations, _ = read_chat(write_parquet([CHAT_RECORDS[2], other], tmp_path / "a.parquet"))
    arguments = [c[1]["tool_calls"][0]["function"]["arguments"] for c in conversations]
    assert arguments == [{"city": "Paris"}, {"day": "mon"}]
    assert conversations[0][0] == {"role": "user", "content": "weather?"}
    assert tools_of(conversations[1]) is None
    # So an assistant turn of tool calls may omit `content`, in JSON too (OpenAI's API allows it).
    calls = {k: v for k, v in other["messages"][1].items() if k != "content"}
    record = {"messages": [other["messages"][0], calls, *other["messages"][2:]]}
    assert read_chat(write_jsonl([record], tmp_path / "c.jsonl"))[0] == conversations[1:]


def test_preference_reads_the_same_from_every_form(tmp_path: Path) -> None:
    a, b, c = (read_preference(p)[0] for p in three_forms(PREFERENCE_RECORDS, tmp_path))
    assert a == b == c and len(a) == 2


@pytest.mark.parametrize("records, fmt", [
    ([{"prompt": "2+2?", "answer": "4", "task": "math"}, {"prompt": "hi"}], "prompt"),
    ([{"prompt": "2+2?", "answer": "4"}, {"prompt": "hi"}], "auto"),
    (CHAT_RECORDS[:2], "messages"),
    ([{"messages": [{"role": "user", "content": "a"}]}, {"prompt": "b"}], "lines"),
])
def test_prompts_read_the_same_from_every_form(tmp_path: Path, records: list, fmt: str) -> None:
    a, b, c = (read_prompts(p, format=fmt)[0] for p in three_forms(records, tmp_path))
    assert a == b == c and len(a) == len(records)
    if fmt == "prompt":  # an answer that only one record has is a null in Parquet: absent, not an error
        assert [r["answer"] for r in b] == ["4", None] and [r["task"] for r in b] == ["math", None]


def test_text_reads_the_same_from_every_form_and_any_column(tmp_path: Path) -> None:
    docs = ["first document", "second  one\nwith a newline", "  third  "]
    paths = three_forms([{"text": d, "id": k} for k, d in enumerate(docs)], tmp_path)
    assert [read_text(p)[0] for p in paths] == [docs] * 3
    body = write_parquet([{"body": d} for d in docs], tmp_path / "body.parquet")
    assert list(iter_text(body, field="body")) == docs
    with pytest.raises(ValueError, match="mode='file'"):
        iter_text(paths[1], mode="file")


def test_parquet_is_read_in_row_batches_numbered_across_them(tmp_path: Path) -> None:
    records = [{"text": f"doc {k}"} for k in range(10)]
    path = write_parquet(records, tmp_path / "t.parquet", row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 4
    assert list(columnar_rows(path, batch_rows=2)) == list(enumerate(records))
    bad = write_parquet(records[:7] + [{"text": "   "}] + records[8:], tmp_path / "bad.parquet", row_group_size=3)
    err = raises(read_text, bad)
    assert (err.index, err.index_kind, err.field, err.reason) == (7, "row", "text", "empty_text")
    assert str(err) == f"{bad}: row 7 (0-based): field 'text': empty text"


# --------------------------------------------------------------------------- real data


REAL = [
    ("alpaca_en_demo.json", "chat"),
    ("glaive_toolcall_en_demo.json", "chat"),
    ("v1_sft_demo.jsonl", "chat"),
    ("reason_tool_use_demo_50.jsonl", "chat"),
    ("dpo_en_demo.json", "preference"),
    ("v1_dpo_demo.jsonl", "preference"),
    ("c4_demo.jsonl", "text"),
]


def _load_json(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name, kind", REAL)
def test_real_files_read_the_same_as_parquet_and_saved_folders(tmp_path: Path, lf: Path, name: str, kind: str) -> None:
    records = _load_json(lf / name)
    forms = [lf / name, write_parquet(records, tmp_path / "d.parquet"), write_saved_dataset(records, tmp_path / "d")]
    if kind == "chat":
        results = [read_chat(p, on_error="skip") for p in forms]
        assert len({json.dumps(with_tools(r[0])) for r in results}) == 1
    elif kind == "preference":
        results = [read_preference(p, on_error="skip") for p in forms]
        assert results[0][0] == results[1][0] == results[2][0]
    else:
        results = [read_text(p) for p in forms]
        assert results[0][0] == results[1][0] == results[2][0]
    reports = [r[1] for r in results]
    assert reports[0].kept > 0
    assert len({(r.kept, tuple(sorted(r.skipped.items())), tuple(sorted(r.ignored.items()))) for r in reports}) == 1


def _examples(module: Any) -> list[dict[str, list]]:
    module.setup("fit")
    out = []
    for dataset in (module.train_set, module.val_set):
        for i in range(len(dataset) if dataset is not None else 0):
            out.append({k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in dataset[i].items()})
    return out


@pytest.mark.parametrize("name, data, options", [("alpaca_en_demo.json", SFTData, {"packing": "none"}),
                                                 ("dpo_en_demo.json", PreferenceData, {})])
def test_real_files_encode_the_same_examples_from_parquet(tmp_path: Path, cache: Path, lf: Path, name: str,
                                                          data: type, options: dict) -> None:
    records = _load_json(lf / name)[:40]
    json_file = tmp_path / "d.json"
    json_file.write_text(json.dumps(records), encoding="utf-8")
    forms = [json_file, write_parquet(records, tmp_path / "d.parquet"), write_saved_dataset(records, tmp_path / "d")]
    examples = [_examples(data(files=[str(p)], seq_len=LONG, cache_dir=str(cache), **options)) for p in forms]
    assert len(examples[0]) >= 30 and examples[0] == examples[1] == examples[2]


def test_tool_calls_encode_the_same_from_parquet(tmp_path: Path, cache: Path, lf: Path, shared_data: Path) -> None:
    # Glaive's tool schemas and calls, rendered by Qwen2.5's own template, token for token.
    base = default_tokenizer(cache)
    backend = tokenizers.Tokenizer.from_str(base.backend.to_str())
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in ("<|im_start|>", "<|im_end|>")])
    source = (shared_data / "chat_templates" / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(encoding="utf-8")
    tok = Tokenizer(backend, eos_token="<|im_end|>", pad_token=base.pad_token, chat_template=source)
    template = resolve_template("auto", tok)
    records = _load_json(lf / "glaive_toolcall_en_demo.json")[:30]
    forms = [lf / "glaive_toolcall_en_demo.json", write_parquet(records, tmp_path / "d.parquet"),
             write_saved_dataset(records, tmp_path / "d")]
    encoded = []
    for path in forms:
        conversations = read_chat(path)[0][:30]
        assert sum(1 for c in conversations if tools_of(c)) >= 10
        encoded.append([{k: list(v) for k, v in template.encode(c, tok).items()} for c in conversations])
    assert encoded[0] == encoded[1] == encoded[2]


def test_pretrain_tokens_are_the_same_from_parquet(tmp_path: Path, cache: Path, lf: Path) -> None:
    records = _load_json(lf / "c4_demo.jsonl")[:50]
    forms = three_forms(records, tmp_path)
    tokens = []
    for p in forms:
        module = PretrainData(files=[str(p)], seq_len=SEQ, cache_dir=str(tmp_path / "cache"),
                              tokenizer=str(cache / "default-tokenizer-1024"))
        tokens.append(module.token_cache().read_bytes())
    assert tokens[0] and tokens[0] == tokens[1] == tokens[2]


# --------------------------------------------------------------------------- errors


ALPACA_BAD = [
    {"instruction": "a", "output": "x"},
    {"instruction": "b", "output": None},  # a null in a required field
    {"instruction": "c", "output": "z"},
]


@pytest.mark.parametrize("form", ["parquet", "saved"])
def test_null_in_a_required_field_names_file_row_and_field(tmp_path: Path, form: str) -> None:
    path = (write_parquet(ALPACA_BAD, tmp_path / "a.parquet") if form == "parquet"
            else write_saved_dataset(ALPACA_BAD, tmp_path / "a"))
    err = raises(read_chat, path)
    assert (err.path, err.index, err.index_kind, err.field, err.reason) == (path, 1, "row", "output", "missing_field")
    assert str(err) == f"{path}: row 1 (0-based): field 'output': missing or null field"
    assert str(pickle.loads(pickle.dumps(err))) == str(err)  # DataLoader workers and DDP pickle errors
    kept, report = read_chat(path, on_error="skip")
    assert len(kept) == 2 and report.skipped == {"missing_field": 1}


def test_wrong_column_type_names_row_and_field_and_skip_counts(tmp_path: Path) -> None:
    path = write_parquet([{"instruction": "a", "output": 1}, {"instruction": "b", "output": 2}], tmp_path / "a.parquet")
    err = raises(read_chat, path, format="alpaca")
    assert (err.index, err.field, err.reason) == (0, "output", "wrong_type")
    assert "expected string, got number" in str(err)
    err = raises(read_chat, path, format="alpaca", on_error="skip")  # every row bad: never an empty epoch
    assert err.reason == "empty_dataset" and "wrong_type: 2" in str(err)


def test_missing_column_names_the_field(tmp_path: Path) -> None:
    path = write_parquet([{"prompt": "q", "chosen": "a"}, {"prompt": "r", "chosen": "b"}], tmp_path / "p.parquet")
    err = raises(read_preference, path)
    assert (err.index, err.field, err.reason) == (0, "rejected", "missing_field")
    text = write_parquet([{"body": "x"}], tmp_path / "t.parquet")
    err = raises(read_text, text)
    assert (err.index, err.field, err.reason) == (0, "text", "missing_field")


def test_nested_errors_name_the_nested_field(tmp_path: Path) -> None:
    records = [CHAT_RECORDS[0], {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "r"}]}]
    path = write_parquet(records, tmp_path / "m.parquet")
    err = raises(read_chat, path)
    assert (err.index, err.field, err.reason) == (1, "messages[1].role", "unknown_role")
    _, report = read_chat(path, on_error="skip")
    assert report.kept == 1 and report.skipped == {"unknown_role": 1}


def test_unused_columns_follow_the_same_rule_as_json_fields(tmp_path: Path) -> None:
    records = [{"instruction": "a", "output": "x", "source": "web", "score": 3}]
    path = write_parquet(records, tmp_path / "a.parquet")
    assert raises(read_chat, path).field == "score"
    _, report = read_chat(path, on_error="skip")
    assert report.ignored == {"source": 1, "score": 1}


def test_unreadable_sources_are_file_level_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.parquet"
    junk.write_text('{"not": "parquet"}\n')
    assert raises(read_chat, junk, on_error="skip").reason == "unreadable_file"
    plain = tmp_path / "plain"
    plain.mkdir()
    err = raises(read_chat, plain)
    assert err.reason == "unsupported_folder" and "state.json" in str(err)
    splits = tmp_path / "dict"
    splits.mkdir()
    (splits / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    err = raises(read_preference, splits)
    assert err.reason == "unsupported_folder" and str(splits / "train") in str(err)
    assert raises(read_chat, tmp_path / "data.csv").reason == "unsupported_extension"


def test_a_big_row_group_is_not_loaded_whole(tmp_path: Path) -> None:
    # One 32 MB row group: pyarrow's default reads (pre-buffering, unbuffered column chunks) hold all of it.
    docs = [f"{k:08d} " + "word " * 400 for k in range(16000)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": docs}), path, row_group_size=len(docs), compression="none")
    assert path.stat().st_size > 32e6
    before, peak, count = pa.total_allocated_bytes(), 0, 0
    for _, row in columnar_rows(path):
        count += 1
        peak = max(peak, pa.total_allocated_bytes() - before)
    assert count == len(docs) and peak < 12e6  # a few batches' worth


# --------------------------------------------------------------------------- the command line


def test_fit_reads_a_parquet_file_and_names_a_bad_row(tmp_path: Path, cache: Path, lf: Path) -> None:
    from clirun import fit_args, ok, run, tiny_fragment

    records = _load_json(lf / "dpo_en_demo.json")[:24]
    good = write_parquet(records, tmp_path / "pairs.parquet")
    fragment = tiny_fragment(tmp_path, cache, steps=2, stage="dpo", seq_len=256,
                             extra={"data": {"init_args": {"files": [str(good)], "on_error": "skip"}}})
    ok(run(fit_args("dpo", fragment, "--trainer.default_root_dir", str(tmp_path / "runs")), tmp_path, timeout=240))
    records[5] = {**records[5], "rejected": None}
    bad = write_parquet(records, tmp_path / "bad.parquet")
    fragment = tiny_fragment(tmp_path, cache, steps=2, stage="dpo",
                             extra={"data": {"init_args": {"files": [str(bad)]}}})
    result = run(fit_args("dpo", fragment, "--trainer.default_root_dir", str(tmp_path / "runs")), tmp_path, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{bad}: row 5 (0-based): field 'rejected': missing or null field" in result.stderr


def test_kto_records_read_the_same_from_parquet_and_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmstages.data.formats import read_kto

    rows = [{"prompt": "What is 2 + 3?", "completion": "5", "label": True},
            {"prompt": "What is 2 + 3?", "completion": "6", "label": False}]
    jsonl = tmp_path / "kto.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "kto.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert read_kto(parquet)[0] == read_kto(jsonl)[0] and len(read_kto(parquet)[0]) == 2
