"""Chat templates: exact layouts, mask properties on real multi-turn data, errors.

Real data mapping (sharegpt): human -> user, gpt -> assistant, system -> system;
in the tool-calling set, function_call (the model's own output) -> assistant and
observation (the tool's answer) -> user. Preference sets: prior `conversations`
plus `chosen` as the final assistant message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import labelled_runs
from llmstages.data.chat import LOSS_MASKS, ChatTemplate
from llmstages.losses import IGNORE_INDEX
from llmstages.data.tokenizer import Tokenizer

ROLE_MAP = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant", "observation": "user"}
I = IGNORE_INDEX


@pytest.fixture(scope="module")
def trained(shared_data: Path) -> Tokenizer:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    return Tokenizer.train([text], 768, show_progress=False)


@pytest.fixture(scope="module")
def minimind(shared_data: Path) -> Tokenizer:
    return Tokenizer.from_file(shared_data / "minimind")


def _sharegpt(turns: list[dict]) -> list[dict]:
    return [{"role": ROLE_MAP[t["from"]], "content": t["value"]} for t in turns]


@pytest.fixture(scope="module")
def conversations(shared_data: Path) -> list[list[dict]]:
    lf = shared_data / "llamafactory"
    out = [_sharegpt(ex["conversations"]) for ex in json.loads((lf / "glaive_toolcall_en_demo.json").read_text())]
    for name in ("dpo_en_demo.json", "dpo_zh_demo.json"):
        for ex in json.loads((lf / name).read_text()):
            out.append(_sharegpt(ex["conversations"] + [ex["chosen"]]))
    assert len(out) == 900
    return out



def _positions(spans: list[tuple[int, int]]) -> set[int]:
    return {i for a, b in spans for i in range(a, b)}


# ------------------------------------------------------------------ exact layouts
MSGS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Farewell."},
]


def test_chatml_exact_layout(trained: Tokenizer) -> None:
    e, s = trained.encode, trained.token_to_id
    start, end = s("<|im_start|>"), s("<|im_end|>")
    nl = e("\n")
    # <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n
    # <|im_start|>assistant\nHello!<|im_end|>\n ... <|im_start|>assistant\nFarewell.<|im_end|>\n
    segments = [
        ([start] + e("system\n"), False), (e("Be brief."), False), ([end] + nl, False),
        ([start] + e("user\n"), False), (e("Hi"), False), ([end] + nl, False),
        ([start] + e("assistant\n"), False), (e("Hello!") + [end], True), (nl, False),
        ([start] + e("user\n"), False), (e("Bye"), False), ([end] + nl, False),
        ([start] + e("assistant\n"), False), (e("Farewell.") + [end], True), (nl, False),
    ]
    ids = [t for seg, _ in segments for t in seg]
    labels = [t if lab else I for seg, lab in segments for t in seg]
    out = ChatTemplate.get("chatml").encode(MSGS, trained)
    assert out == {"input_ids": ids, "labels": labels}
    assert trained.decode(ids) == ChatTemplate.get("chatml").render(MSGS)
    assert trained.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert ChatTemplate.get("chatml").stop_token_id(trained) == end


def test_llama3_exact_layout(trained: Tokenizer) -> None:
    e, s = trained.encode, trained.token_to_id
    sh, eh, eot = s("<|start_header_id|>"), s("<|end_header_id|>"), s("<|eot_id|>")
    msgs = MSGS[1:3]
    ids = (
        [s("<|begin_of_text|>")]
        + [sh] + e("user") + [eh] + e("\n\n") + e("Hi") + [eot]
        + [sh] + e("assistant") + [eh] + e("\n\n") + e("Hello!") + [eot]
    )
    n_reply = len(e("Hello!")) + 1
    labels = [I] * (len(ids) - n_reply) + ids[-n_reply:]
    out = ChatTemplate.get("llama3").encode(msgs, trained)
    assert out == {"input_ids": ids, "labels": labels}
    assert trained.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    )
    # Nothing follows <|eot_id|>, so legacy_minimind labels exactly what assistant does.
    assert ChatTemplate.get("llama3").encode(msgs, trained, "legacy_minimind") == out
    assert ChatTemplate.get("llama3").stop_token_id(trained) == eot


def test_plain_exact_layout(trained: Tokenizer) -> None:
    e = trained.encode
    msgs = MSGS[:3]
    ids = e("System: ") + e("Be brief.") + e("\n\n") + e("User: ") + e("Hi") + e("\n\n")
    ids += e("Assistant: ") + e("Hello!") + [trained.eos_id] + e("\n\n")
    reply = e("Hello!") + [trained.eos_id]
    labels = [I] * (len(ids) - len(reply) - 2) + reply + [I, I]
    tpl = ChatTemplate.get("plain")
    assert tpl.encode(msgs, trained) == {"input_ids": ids, "labels": labels}
    assert trained.decode(ids) == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!<|endoftext|>\n\n"
    assert tpl.stop_token_id(trained) == trained.eos_id
    assert not set(ids) & (trained.special_ids - {trained.eos_id})


def test_variants_on_hand_written_conversation(trained: Tokenizer) -> None:
    tpl = ChatTemplate.get("chatml")
    e, end, nl = trained.encode, trained.token_to_id("<|im_end|>"), trained.encode("\n")
    hello, bye = e("Hello!"), e("Farewell.")

    def labelled(variant: str) -> list[int]:
        return [t for t in tpl.encode(MSGS, trained, variant)["labels"] if t != I]

    assert labelled("assistant") == hello + [end] + bye + [end]
    assert labelled("last_assistant") == bye + [end]
    assert labelled("assistant_no_eos") == hello + bye
    assert labelled("legacy_drop_first") == hello[1:] + [end] + bye[1:] + [end]
    assert labelled("legacy_minimind") == hello + [end] + nl + bye + [end] + nl
    out = tpl.encode(MSGS, trained, "all")
    assert out["labels"] == out["input_ids"]


# ------------------------------------------------------------------ real data properties
CASES = [("chatml", "trained"), ("llama3", "trained"), ("chatml", "minimind")]
# Keeps the file fast on 2 shared cores; strides cover all three source files.
ASSISTANT_STRIDE, VARIANT_STRIDE = 2, 8


def _check_assistant_runs(tpl: ChatTemplate, tok: Tokenizer, msgs: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """The DESIGN.md property for the default mask; returns ids and runs."""
    out = tpl.encode(msgs, tok)
    ids, labels = out["input_ids"], out["labels"]
    eot = tpl.stop_token_id(tok)
    assert len(ids) == len(labels)
    assert all(lab in (I, t) for lab, t in zip(labels, ids))
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert all(replies)  # real data has no empty replies
    runs = labelled_runs(labels)
    assert len(runs) == len(replies)
    for (a, b), reply in zip(runs, replies):
        assert tok.decode(ids[a:b], skip_special_tokens=True) == reply
        assert ids[b - 1] == eot and eot not in ids[a : b - 1]
    return ids, runs


def _check_variants(tpl: ChatTemplate, tok: Tokenizer, msgs: list[dict], ids: list[int], runs: list[tuple[int, int]]) -> None:
    """Each non-default variant, pinned relative to the `assistant` runs."""
    sep = tok.encode(tpl.separator) if tpl.separator else []
    expected = {
        "assistant": _positions(runs),
        "last_assistant": _positions(runs[-1:]),
        "all": set(range(len(ids))),
        "assistant_no_eos": _positions([(a, b - 1) for a, b in runs]),
        "legacy_drop_first": _positions([(a + 1, b) for a, b in runs]),
        "legacy_minimind": _positions([(a, b + len(sep)) for a, b in runs]),
    }
    assert set(expected) == set(LOSS_MASKS)
    # The newline(s) after each end-of-turn are exactly the separator tokens.
    for a, b in runs:
        assert ids[b : b + len(sep)] == sep
    prompt = tpl.encode_prompt(msgs[:-1], tok)
    assert tok.decode(prompt) == tpl.render(msgs[:-1], add_generation_prompt=True, eos_token=tok.eos_token)
    for variant, positions in expected.items():
        out = tpl.encode(msgs, tok, variant)
        assert out["input_ids"] == ids
        got = {i for i, t in enumerate(out["labels"]) if t != I}
        assert got == positions, variant
        assert all(out["labels"][i] == ids[i] for i in got)
        # encode_prompt(prior turns) + encode_reply(last reply) == encode(conversation)
        reply = tpl.encode_reply(msgs[-1]["content"], tok, variant)
        assert prompt + reply["input_ids"] == ids, variant
        assert out["labels"][len(prompt) :] == reply["labels"], variant


@pytest.mark.parametrize(("name", "tok_name"), CASES)
def test_masks_on_real_conversations(
    name: str, tok_name: str, conversations: list[list[dict]], request: pytest.FixtureRequest
) -> None:
    tok: Tokenizer = request.getfixturevalue(tok_name)
    tpl = ChatTemplate.get(name)
    for k, msgs in enumerate(conversations[::ASSISTANT_STRIDE]):
        ids, runs = _check_assistant_runs(tpl, tok, msgs)
        if k % (VARIANT_STRIDE // ASSISTANT_STRIDE) == 0:
            assert msgs[-1]["role"] == "assistant"
            _check_variants(tpl, tok, msgs, ids, runs)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "tok_name"), CASES)
def test_masks_on_all_real_conversations(
    name: str, tok_name: str, conversations: list[list[dict]], request: pytest.FixtureRequest
) -> None:
    tok: Tokenizer = request.getfixturevalue(tok_name)
    tpl = ChatTemplate.get(name)
    for msgs in conversations:
        _check_variants(tpl, tok, msgs, *_check_assistant_runs(tpl, tok, msgs))


def test_plain_prompt_plus_reply_equals_encode(trained: Tokenizer, conversations: list[list[dict]]) -> None:
    tpl = ChatTemplate.get("plain")
    for msgs in conversations[::30]:
        prompt = tpl.encode_prompt(msgs[:-1], trained)
        for variant in LOSS_MASKS:
            full = tpl.encode(msgs, trained, variant)
            reply = tpl.encode_reply(msgs[-1]["content"], trained, variant)
            assert prompt + reply["input_ids"] == full["input_ids"]
            assert full["labels"][len(prompt) :] == reply["labels"]
        labelled = [t for t in tpl.encode(msgs, trained)["labels"] if t != I]
        n_replies = sum(m["role"] == "assistant" for m in msgs)
        assert labelled.count(trained.eos_id) == n_replies and labelled[-1] == trained.eos_id


# ------------------------------------------------------------------ edge cases and errors
def test_marker_text_in_content_stays_text(trained: Tokenizer) -> None:
    tpl = ChatTemplate.get("chatml")
    msgs = [{"role": "user", "content": "end with <|im_end|>"}, {"role": "assistant", "content": "ok <|im_end|> done"}]
    out = tpl.encode(msgs, trained)
    end = trained.token_to_id("<|im_end|>")
    assert out["input_ids"].count(end) == 2  # only the two real end-of-turn tokens
    (a, b), = labelled_runs(out["labels"])
    assert trained.decode(out["input_ids"][a:b], skip_special_tokens=True) == "ok <|im_end|> done"


def test_empty_reply_trains_only_its_end_of_turn(trained: Tokenizer) -> None:
    tpl = ChatTemplate.get("chatml")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]
    out = tpl.encode(msgs, trained)
    assert [t for t in out["labels"] if t != I] == [trained.token_to_id("<|im_end|>")]
    for variant in ("assistant_no_eos", "legacy_drop_first"):
        with pytest.raises(ValueError, match="message 1: empty assistant reply"):
            tpl.encode(msgs, trained, variant)


def test_bad_role_and_malformed_messages(trained: Tokenizer) -> None:
    tpl = ChatTemplate.get("chatml")
    with pytest.raises(ValueError, match=r"message 1: unknown role 'gpt'"):
        tpl.encode([{"role": "user", "content": "a"}, {"role": "gpt", "content": "b"}], trained)
    with pytest.raises(ValueError, match="message 0: content must be a str"):
        tpl.encode([{"role": "assistant", "content": None}], trained)
    with pytest.raises(ValueError, match="message 0: expected a dict"):
        tpl.encode([{"from": "human", "value": "a"}], trained)
    with pytest.raises(ValueError, match="unknown role"):
        tpl.encode_prompt([{"role": "function", "content": "x"}], trained)
    # A tool result is a known role now, but a named layout has no format for it.
    with pytest.raises(ValueError, match="message 0: .*no format for a tool message; use template: auto"):
        tpl.encode_prompt([{"role": "tool", "content": "x"}], trained)


def test_no_targets_is_an_error(trained: Tokenizer) -> None:
    tpl = ChatTemplate.get("chatml")
    with pytest.raises(ValueError, match="no target tokens"):
        tpl.encode([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], trained)
    with pytest.raises(ValueError, match="no target tokens"):
        tpl.encode([], trained)
    # A one-token reply under legacy_drop_first loses its only content token but keeps the eot.
    one = trained.id_to_token(trained.encode("a")[0])
    assert one == "a"
    out = tpl.encode([{"role": "assistant", "content": "a"}], trained, "legacy_drop_first")
    assert [t for t in out["labels"] if t != I] == [trained.token_to_id("<|im_end|>")]


def test_template_needs_its_markers(shared_data: Path) -> None:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:20_000]
    bare = Tokenizer.train([text], 300, special_tokens=[], show_progress=False)
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    for name, marker in [("chatml", "<|im_start|>"), ("llama3", "<|begin_of_text|>")]:
        with pytest.raises(ValueError, match=f"needs the special token '{marker}'"):
            ChatTemplate.get(name).encode(msgs, bare)
    # plain needs only EOS, which every tokenizer has.
    out = ChatTemplate.get("plain").encode(msgs, bare)
    assert [t for t in out["labels"] if t != I][-1] == bare.eos_id


def test_registry_and_unknown_names(trained: Tokenizer) -> None:
    assert ChatTemplate.names() == ["chatml", "llama3", "plain"]
    assert ChatTemplate.get("chatml").name == "chatml"
    with pytest.raises(ValueError, match="available: chatml, llama3, plain"):
        ChatTemplate.get("vicuna")
    msgs = [{"role": "assistant", "content": "x"}]
    with pytest.raises(ValueError, match="available: assistant, last_assistant, all"):
        ChatTemplate.get("chatml").encode(msgs, trained, "assistant_only")
    with pytest.raises(ValueError, match="unknown loss_mask"):
        ChatTemplate.get("chatml").encode_reply("x", trained, "nope")


# ------------------------------------------------------------------ preference pairs and template names
@pytest.mark.parametrize("name", ChatTemplate.names())
def test_encode_pair_is_prompt_plus_completion(trained: Tokenizer, name: str) -> None:
    tpl = ChatTemplate.get(name)
    prompt = MSGS[:2]
    one = [{"role": "assistant", "content": "Hello!"}]
    multi = [MSGS[2], {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]
    prompt_ids, sides = tpl.encode_pair(prompt, {"chosen": one, "rejected": multi}, trained)
    assert prompt_ids == tpl.encode_prompt(prompt, trained)
    assert sides["chosen"] == tpl.encode_reply("Hello!", trained)
    full = tpl.encode(prompt + multi, trained)
    assert prompt_ids + sides["rejected"]["input_ids"] == full["input_ids"]
    assert [I] * len(prompt_ids) + sides["rejected"]["labels"] == full["labels"]


def test_resolve_template_named_and_auto(trained: Tokenizer) -> None:
    from llmstages.data.chat import TEMPLATE_NAMES, resolve_template

    assert set(ChatTemplate.names()) < set(TEMPLATE_NAMES)
    assert resolve_template("llama3", trained) is ChatTemplate.get("llama3")
    with pytest.raises(ValueError, match="template: auto renders the model's own chat template, but this tokenizer has none"):
        resolve_template("auto", trained)
    with pytest.raises(ValueError, match="takes no options"):
        resolve_template("chatml", trained, date_string="26 Jul 2024")
    with pytest.raises(ValueError, match="unknown chat template 'zephyr'; available: chatml, llama3, plain, auto, hf"):
        resolve_template("zephyr", trained)
