"""Reasoning traces, tool calls and `weight: 0` through the model's own template (`template: auto`).

Every rendering is compared with `transformers`' `apply_chat_template` (with
`tools=`), on the released templates under shared/data/chat_templates that
support the feature; labels are compared with the replies written out by hand
per template family (what the template renders where the model writes);
templates that drop tool calls are refused, never silently trained without them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
import logging
from pathlib import Path

import pytest
import tokenizers

from helpers import labelled_runs
from llmstages.data.base import default_tokenizer
from llmstages.data.chat import DEFAULT_DATE_STRING, ChatTemplate, HFChatTemplate, resolve_template
from llmstages.data.chat.messages import Conversation
from llmstages.data.tokenizer import Tokenizer

QWEN = (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], ["<tool_call>", "</tool_call>", "<think>", "</think>"], "<|im_end|>", None)
LLAMA = (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"], [],
         "<|eot_id|>", "<|begin_of_text|>")
# file stem -> (special tokens, added text tokens, eos, bos)
MODELS = {
    "Qwen-Qwen2.5-7B-Instruct": QWEN,
    "Qwen-Qwen3-0.6B": QWEN,
    "Qwen-QwQ-32B": QWEN,
    "jingyaogong-minimind": QWEN,
    "HuggingFaceTB-SmolLM3-3B": QWEN,
    "meta-llama-Llama-3.1-8B-Instruct": LLAMA,
    "meta-llama-Llama-3.2-3B-Instruct": LLAMA,
    "mistralai-Mistral-Nemo-Instruct-2407": (
        ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
         "[/TOOL_RESULTS]"], [], "</s>", "<s>"),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": (
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"], ["<think>", "</think>"],
        "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>"),
    "google-gemma-2-2b-it": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], [], "<eos>", "<bos>"),
    "microsoft-Phi-3.5-mini-instruct": (["<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"], [], "<|endoftext|>", "<s>"),
    "ibm-granite-granite-3.3-2B-Instruct": (["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"], [], "<|end_of_text|>", None),
}
TOOL_TEMPLATES = ["Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "Qwen-QwQ-32B", "jingyaogong-minimind",
                  "meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct", "mistralai-Mistral-Nemo-Instruct-2407"]
NO_TOOL_CALLS = ["HuggingFaceTB-SmolLM3-3B", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "google-gemma-2-2b-it",
                 "microsoft-Phi-3.5-mini-instruct", "ibm-granite-granite-3.3-2B-Instruct"]
PARALLEL = {"Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "Qwen-QwQ-32B", "jingyaogong-minimind"}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _call(city: str, id_: str) -> dict:
    return {"id": id_, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}


def _result(temp: int, id_: str) -> dict:
    return {"role": "tool", "content": f'{{"temp": {temp}}}', "tool_call_id": id_, "name": "get_weather"}


Q = {"role": "user", "content": "What is 2+2?"}
REASONING = {
    "inline": [Q, {"role": "assistant", "content": "<think>\nI add two and two.\n</think>\n\nIt is 4."}],
    "field": [Q, {"role": "assistant", "content": "It is 4.", "reasoning_content": "I add two and two."}],
    "multi": [
        Q, {"role": "assistant", "content": "It is 4.", "reasoning_content": "I add."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>three and three</think>It is 6."},
    ],
}
TOOLS = {
    "no_content": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("Paris", "call00001")]},
        _result(21, "call00001"),
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("Paris", "call00001")]},
        _result(21, "call00001"),
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
        {"role": "user", "content": "And in Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("Rome", "call00002")]},
        _result(25, "call00002"),
        {"role": "assistant", "content": "It is 25 degrees in Rome."},
    ],
    "parallel_consecutive_weight0": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [_call("Paris", "call00001"), _call("Rome", "call00002")]},
        _result(21, "call00001"),
        _result(25, "call00002"),
        {"role": "assistant", "content": "Paris 21, Rome 25.", "weight": 0},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ],
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>'
# What each template family writes where the model writes, per conversation (labelled text, eot included).
EXPECTED_REASONING = {
    "Qwen-Qwen3-0.6B": {
        "inline": ["<think>\nI add two and two.\n</think>\n\nIt is 4.<|im_end|>"],
        "field": ["<think>\nI add two and two.\n</think>\n\nIt is 4.<|im_end|>"],
        "multi": ["It is 4.<|im_end|>", "<think>\nthree and three\n</think>\n\nIt is 6.<|im_end|>"],  # history dropped
    },
    "jingyaogong-minimind": {
        "inline": ["<think>\nI add two and two.\n</think>\n\nIt is 4.<|im_end|>"],
        "field": ["<think>\nI add two and two.\n</think>\n\nIt is 4.<|im_end|>"],
        "multi": ["<think>\nI add.\n</think>\n\nIt is 4.<|im_end|>", "<think>\nthree and three\n</think>\n\nIt is 6.<|im_end|>"],
    },
    "Qwen-QwQ-32B": {  # reads inline reasoning only, keeps it in the last turn as written
        "inline": ["<think>\nI add two and two.\n</think>\n\nIt is 4.<|im_end|>"],
        "field": ["It is 4.<|im_end|>"],
        "multi": ["It is 4.<|im_end|>", "<think>three and three</think>It is 6.<|im_end|>"],
    },
    "HuggingFaceTB-SmolLM3-3B": {
        "inline": ["<think>\nI add two and two.\n</think>\n\nIt is 4.<|im_end|>"],
        "field": ["It is 4.<|im_end|>"],
        "multi": ["It is 4.<|im_end|>", "<think>three and three</think>It is 6.<|im_end|>"],
    },
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": {  # drops reasoning from every turn
        "inline": ["\n\nIt is 4.<｜end▁of▁sentence｜>"],
        "field": ["It is 4.<｜end▁of▁sentence｜>"],
        "multi": ["It is 4.<｜end▁of▁sentence｜>", "It is 6.<｜end▁of▁sentence｜>"],
    },
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return default_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def fixed_today(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' strftime_now reads the clock; pin it to our date_string's day."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")

    class Pinned(dt.datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206
            return cls.strptime(DEFAULT_DATE_STRING, "%d %b %Y")

    monkeypatch.setattr(utils, "datetime", Pinned)


def _model(base: Tokenizer, shared_data: Path, stem: str) -> tuple[Tokenizer, object]:
    source = (shared_data / "chat_templates" / f"{stem}.jinja").read_text(encoding="utf-8")
    special, plain, eos, bos = MODELS[stem]
    backend = tokenizers.Tokenizer.from_str(base.backend.to_str())
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in plain])
    tok = Tokenizer(backend, eos_token=eos, pad_token=base.pad_token, bos_token=bos, chat_template=source)
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(backend.to_str()), chat_template=source, **tok.special_tokens_map
    )
    return tok, hf


def _hf_ids(hf: object, msgs: list[dict], tools: list | None = None, **kwargs: object) -> list[int]:
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]  # `weight` is ours
    return hf.apply_chat_template(plain, tools=tools, tokenize=True, date_string=DEFAULT_DATE_STRING, return_dict=False, **kwargs)


def _labelled(tok: Tokenizer, out: dict) -> list[str]:
    return [tok.decode(out["input_ids"][a:b]) for a, b in labelled_runs(out["labels"])]


# ------------------------------------------------------------------ reasoning
@pytest.mark.parametrize("stem", sorted(EXPECTED_REASONING))
def test_reasoning_matches_transformers_and_labels_what_the_template_keeps(
    base: Tokenizer, shared_data: Path, fixed_today: None, stem: str, caplog: pytest.LogCaptureFixture
) -> None:
    tok, hf = _model(base, shared_data, stem)
    template = resolve_template("auto", tok)
    for name, msgs in REASONING.items():
        with caplog.at_level(logging.WARNING):
            out = template.encode(msgs, tok)
        assert out["input_ids"] == _hf_ids(hf, msgs), (stem, name)
        assert _labelled(tok, out) == EXPECTED_REASONING[stem][name], (stem, name)
        # Inserted empty scaffolding is never a target.
        text = tok.decode(out["input_ids"])
        if "<think>\n\n</think>" in text:
            assert all("<think>\n\n</think>" not in t for t in _labelled(tok, out))
    if EXPECTED_REASONING[stem]["field"] == ["It is 4." + MODELS[stem][2]]:
        # A final reply's reasoning_content that the template never reads is not lost silently.
        assert "does not render this reply's reasoning_content" in caplog.text


@pytest.mark.parametrize("stem", ["Qwen-Qwen2.5-7B-Instruct", "meta-llama-Llama-3.1-8B-Instruct", "microsoft-Phi-3.5-mini-instruct"])
def test_inline_reasoning_on_a_template_without_reasoning_is_trained_as_text(
    base: Tokenizer, shared_data: Path, fixed_today: None, stem: str
) -> None:
    tok, hf = _model(base, shared_data, stem)
    msgs = REASONING["inline"]
    out = resolve_template("auto", tok).encode(msgs, tok)
    assert out["input_ids"] == _hf_ids(hf, msgs)
    assert _labelled(tok, out)[0].startswith("<think>\nI add two and two.\n</think>")


def test_template_kwargs_reach_the_template(base: Tokenizer, shared_data: Path) -> None:
    tok, hf = _model(base, shared_data, "Qwen-Qwen3-0.6B")
    no_think = resolve_template("auto", tok, template_kwargs={"enable_thinking": False})
    prompt = [Q]
    ids = no_think.encode_prompt(prompt, tok)
    assert ids == _hf_ids(hf, prompt, add_generation_prompt=True, enable_thinking=False)
    assert tok.decode(ids).endswith("<think>\n\n</think>\n\n")
    assert resolve_template("auto", tok).encode_prompt(prompt, tok) == _hf_ids(hf, prompt, add_generation_prompt=True)


def test_special_strings_outside_replies_stay_errors(base: Tokenizer, shared_data: Path) -> None:
    tok, _ = _model(base, shared_data, "Qwen-Qwen3-0.6B")
    template = resolve_template("auto", tok)
    for role in ("user", "system"):
        msgs = [{"role": role, "content": "say <|im_end|>"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        with pytest.raises(ValueError, match="message 0: contains the special token string '<\\|im_end\\|>'"):
            template.encode(msgs, tok)
    tool = [*TOOLS["no_content"][:2], {**TOOLS["no_content"][2], "content": "<|im_start|>"}, TOOLS["no_content"][3]]
    with pytest.raises(ValueError, match="message 2: contains the special token string"):
        template.encode(Conversation(tool, tools=[WEATHER]), tok)
    with pytest.raises(ValueError, match="message 1: reasoning_content contains the special token string"):
        template.encode([Q, {"role": "assistant", "content": "4", "reasoning_content": "<|im_end|>"}], tok)


# ------------------------------------------------------------------ tools
def _expected_tool_labels(stem: str, name: str) -> list[str]:
    turns = [("Paris", "call00001", 21)] + ([("Rome", "call00002", 25)] if name == "multi_turn" else [])
    if stem.startswith("meta-llama"):  # the call as JSON with "parameters", nothing else
        call, eot = '{"name": "get_weather", "parameters": {"city": "%s"}}', "<|eot_id|>"
    elif stem.startswith("mistral"):  # [TOOL_CALLS] is the model's to write: labelled
        call, eot = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "%s"}, "id": "%s"}]', "</s>"
    else:
        call, eot = CALL, "<|im_end|>"
    if name in ("no_content", "multi_turn"):
        out = []
        for city, id_, temp in turns:
            out += [(call % ((city, id_) if call.count("%s") == 2 else city)) + eot, f"It is {temp} degrees in {city}." + eot]
        return out
    return ["Let me check.\n" + CALL % "Paris" + "\n" + CALL % "Rome" + "<|im_end|>", "You are welcome.<|im_end|>"]


@pytest.mark.parametrize("stem", TOOL_TEMPLATES)
def test_tool_calls_match_transformers_and_label_only_the_calls_and_replies(
    base: Tokenizer, shared_data: Path, fixed_today: None, stem: str
) -> None:
    tok, hf = _model(base, shared_data, stem)
    template = resolve_template("auto", tok)
    for name, msgs in TOOLS.items():
        if name.startswith("parallel") and stem not in PARALLEL:
            with pytest.raises(ValueError, match="single tool-calls|cannot locate"):  # Llama-3.x: one call a turn; Mistral drops content
                template.encode(Conversation(msgs, tools=[WEATHER]), tok)
            continue
        if name == "multi_turn" and stem.startswith("mistral"):
            # Mistral writes the schemas before the last user turn and checks role alternation over the
            # whole conversation: no sentinel rendering locates an earlier call's start. Loud, not guessed.
            with pytest.raises(ValueError, match="message 1: .*cannot locate"):
                template.encode(Conversation(msgs, tools=[WEATHER]), tok)
            continue
        out = template.encode(Conversation(msgs, tools=[WEATHER]), tok)
        assert out["input_ids"] == _hf_ids(hf, msgs, tools=[WEATHER]), (stem, name)
        labelled = _labelled(tok, out)
        assert labelled == _expected_tool_labels(stem, name), (stem, name)
        text = tok.decode(out["input_ids"])
        for secret in ("temp", "The weather in a city", "Weather in Paris"):  # results, schemas, prompts
            assert secret in text and all(secret not in t for t in labelled), (stem, secret)


def test_consecutive_tool_results_stay_one_turn_with_their_separators(base: Tokenizer, shared_data: Path) -> None:
    tok, _ = _model(base, shared_data, "Qwen-Qwen3-0.6B")
    msgs = TOOLS["parallel_consecutive_weight0"]
    text = tok.decode(resolve_template("auto", tok).encode(Conversation(msgs, tools=[WEATHER]), tok)["input_ids"])
    one_turn = "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n{\"temp\": 25}\n</tool_response><|im_end|>\n"
    assert one_turn in text


@pytest.mark.parametrize("stem", NO_TOOL_CALLS)
def test_template_that_drops_tool_calls_is_refused(base: Tokenizer, shared_data: Path, stem: str) -> None:
    tok, _ = _model(base, shared_data, stem)
    template = resolve_template("auto", tok)
    with pytest.raises(ValueError, match="does not render tool calls"):
        template.encode(Conversation(TOOLS["no_content"], tools=[WEATHER]), tok)


def test_template_that_drops_tool_schemas_is_refused(base: Tokenizer, shared_data: Path) -> None:
    tok, _ = _model(base, shared_data, "microsoft-Phi-3.5-mini-instruct")
    with pytest.raises(ValueError, match="does not render tool schemas"):
        resolve_template("auto", tok).encode(Conversation(REASONING["inline"], tools=[WEATHER]), tok)


def test_named_templates_refuse_tool_parts_and_train_inline_reasoning_as_text(base: Tokenizer) -> None:
    chatml = ChatTemplate.get("chatml")
    with pytest.raises(ValueError, match="message 1: chat template 'chatml' has no format for 'tool_calls'; use template: auto"):
        chatml.encode(TOOLS["no_content"], base)
    with pytest.raises(ValueError, match="no format for tool schemas; use template: auto"):
        chatml.encode(Conversation(REASONING["inline"], tools=[WEATHER]), base)
    with pytest.raises(ValueError, match="'reasoning_content'; use template: auto.*inline as <think>"):
        chatml.encode(REASONING["field"], base)
    out = chatml.encode(REASONING["inline"], base)
    assert _labelled(base, out) == [REASONING["inline"][1]["content"] + "<|im_end|>"]


# ------------------------------------------------------------------ weight: 0
def test_weight_zero_reply_is_context_in_every_template(base: Tokenizer, shared_data: Path) -> None:
    msgs = [
        Q, {"role": "assistant", "content": "It is 5.", "weight": 0},
        {"role": "user", "content": "Are you sure?"}, {"role": "assistant", "content": "Sorry, it is 4."},
    ]
    tok, _ = _model(base, shared_data, "Qwen-Qwen2.5-7B-Instruct")
    for template, t in ((ChatTemplate.get("chatml"), base), (resolve_template("auto", tok), tok)):
        out = template.encode(msgs, t)
        assert _labelled(t, out) == ["Sorry, it is 4.<|im_end|>"]
        unweighted = template.encode([{k: v for k, v in m.items() if k != "weight"} for m in msgs], t)
        assert out["input_ids"] == unweighted["input_ids"]  # the same tokens, one target fewer
        assert len(labelled_runs(unweighted["labels"])) == 2
    with pytest.raises(ValueError, match="no target tokens"):
        ChatTemplate.get("chatml").encode([Q, {"role": "assistant", "content": "x", "weight": 0}], base)
    with pytest.raises(ValueError, match="weight must be 0 or 1"):
        ChatTemplate.get("chatml").encode([Q, {"role": "assistant", "content": "x", "weight": 0.5}], base)


# ------------------------------------------------------------------ the glaive demo, as LLaMA-Factory ships it
def test_glaive_tool_demo_trains_with_its_tools(shared_data: Path, tmp_path: Path) -> None:
    """sharegpt function_call/observation + `tools` through the real minimind folder's own template."""
    from llmstages.data import SFTData
    from llmstages.data.formats import read_chat

    transformers = pytest.importorskip("transformers")
    folder = shared_data / "minimind"
    tok = Tokenizer.from_file(folder)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    template = resolve_template("auto", tok)
    convs, report = read_chat(shared_data / "llamafactory" / "glaive_toolcall_en_demo.json")
    assert report.ignored == Counter()
    with_calls = [c for c in convs if any(m.get("tool_calls") for m in c)][:12]
    assert len(with_calls) == 12
    for conv in with_calls:
        out = template.encode(conv, tok)
        assert out["input_ids"] == hf.apply_chat_template(list(conv), tools=conv.tools, tokenize=True, return_dict=False)
        labelled = _labelled(tok, out)
        replies = [m for m in conv if m["role"] == "assistant"]
        assert len(labelled) == len(replies)
        for text, m in zip(labelled, replies):
            if m.get("tool_calls"):
                assert text == "".join(CALL.replace('"city": "%s"', json.dumps(c["function"]["arguments"], ensure_ascii=False)[1:-1])
                                       .replace("get_weather", c["function"]["name"]) for c in m["tool_calls"]) + "<|im_end|>"
            else:
                assert text.endswith(m["content"] + "<|im_end|>")
        rendered = tok.decode(out["input_ids"])
        assert "<tools>" in rendered and all("<tools>" not in t for t in labelled)

    raw = json.loads((shared_data / "llamafactory" / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    path = tmp_path / "glaive3.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [r for r in raw if r["tools"] != "[]"][:3]), encoding="utf-8")
    data = SFTData(files=[str(path)], tokenizer=str(folder), template="auto", packing="none", val_fraction=0,
                   seq_len=2048, cache_dir=str(tmp_path))
    data.setup("fit")
    assert all("<tools>" in tok.decode(e["input_ids"]) for e in data.train_set.items)


def test_grpo_prompts_from_tool_records_render_with_their_tools(base: Tokenizer, shared_data: Path, tmp_path: Path) -> None:
    """The prompt is the conversation up to the final reply (tool results included), rendered with `tools=`."""
    from llmstages.data.formats import read_prompts

    tok, hf = _model(base, shared_data, "Qwen-Qwen3-0.6B")
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"tools": [WEATHER], "messages": TOOLS["no_content"]}) + "\n", encoding="utf-8")
    (record,), _ = read_prompts(path)
    assert record["answer"] == "It is 21 degrees in Paris."
    for options in ({}, {"template_kwargs": {"enable_thinking": False}}):
        ids = resolve_template("auto", tok, **options).encode_prompt(record["messages"], tok)
        assert ids == _hf_ids(hf, TOOLS["no_content"][:3], tools=[WEATHER], add_generation_prompt=True, **options.get("template_kwargs", {}))


def test_sft_fit_on_tool_records_with_the_folder_template(shared_data: Path, tmp_path: Path, cache: Path) -> None:
    """The whole path a researcher takes: tool-calling records, a model folder's tokenizer and template, `fit`."""
    from clirun import fit_args, ok, run, tiny_fragment

    raw = json.loads((shared_data / "llamafactory" / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    data = tmp_path / "glaive8.json"
    data.write_text(json.dumps([r for r in raw if r["tools"] != "[]"][:8]), encoding="utf-8")
    fragment = tiny_fragment(tmp_path, cache, steps=2, seq_len=512, batch_size=2, extra={"data": {"init_args": {
        "files": [str(data)], "tokenizer": str(shared_data / "minimind"), "template": "auto", "val_fraction": 0}}})
    result = run(fit_args("sft", fragment, "--trainer.default_root_dir", str(tmp_path / "runs")), cwd=tmp_path, timeout=240)
    ok(result)
    assert "sft data: kept 8 examples" in result.stdout + result.stderr
