"""`template: auto`: the model's own Jinja chat template, rendered and masked exactly.

(a) ChatML and Llama-3 written out as Jinja give the named templates' ids and
labels for every loss mask. (b) The 12 real templates under
shared/data/chat_templates render the ids `transformers`' `apply_chat_template`
gives, and the labelled tokens decode to each rendered reply plus its
end-of-turn marker (or a clear error, by name). (c) The PITFALLS behaviours:
not prefix-stable, think dropped from history, trimmed content, inserted empty
think blocks, non-ASCII markers, dropped or refused system messages.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import tokenizers

from helpers import labelled_runs
from llmstages.data.chat import DEFAULT_DATE_STRING, HFChatTemplate
from llmstages.data.base import default_tokenizer
from llmstages.data.chat import LOSS_MASKS, ChatTemplate, resolve_template
from llmstages.losses import IGNORE_INDEX
from llmstages.data.tokenizer import Tokenizer

I = IGNORE_INDEX

CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 is 4."}],
    "system_multi": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How are you?"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "  Blue, I think.  \n"},
    ],
    "think_multi": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nI add two and two.\n</think>\n\nIt is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>three and three</think>It is 6."},
    ],
    "non_ascii": [
        {"role": "user", "content": "你好，世界"},
        {"role": "assistant", "content": "你好！很高兴见到你 😀"},
        {"role": "user", "content": "Danke schön"},
        {"role": "assistant", "content": "Bitte, gern geschehen."},
    ],
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return default_tokenizer(tmp_path_factory.mktemp("tok"))


def _with_tokens(
    base: Tokenizer, special: list[str], plain: list[str] = (), *, eos: str | None = None, bos: str | None = None,
    chat_template: str | None = None,
) -> Tokenizer:
    """The embedded tokenizer plus a model's markers (special) and added text tokens (plain)."""
    backend = tokenizers.Tokenizer.from_str(base.backend.to_str())
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in plain])
    return Tokenizer(
        backend, eos_token=eos or base.eos_token, pad_token=base.pad_token, bos_token=bos, chat_template=chat_template
    )



# ------------------------------------------------------------------ (a) named templates as Jinja
@pytest.mark.parametrize("name,source", [("chatml", CHATML_JINJA), ("llama3", LLAMA3_JINJA)])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_auto_equals_named_template(base: Tokenizer, name: str, source: str, conversation: str) -> None:
    tok = _with_tokens(base, [], bos="<|begin_of_text|>", chat_template=source)
    auto, named = resolve_template("auto", tok), ChatTemplate.get(name)
    msgs = CONVERSATIONS[conversation]
    for mask in LOSS_MASKS:
        assert auto.encode(msgs, tok, loss_mask=mask) == named.encode(msgs, tok, loss_mask=mask), mask
    assert auto.encode_prompt(msgs[:-1], tok) == named.encode_prompt(msgs[:-1], tok)
    assert auto.stop_token_id(tok) == named.stop_token_id(tok)
    reply = msgs[-1]["content"]
    assert auto.encode_reply(reply, tok, prompt=msgs[:-1]) == named.encode_reply(reply, tok)
    other = [{"role": "assistant", "content": "Something else entirely."}]
    assert auto.encode_pair(msgs[:-1], {"chosen": msgs[-1:], "rejected": other}, tok) == named.encode_pair(
        msgs[:-1], {"chosen": msgs[-1:], "rejected": other}, tok
    )
    assert auto.render(msgs, tok) == named.render(msgs)


def test_auto_equals_named_on_empty_reply_and_errors(base: Tokenizer) -> None:
    tok = _with_tokens(base, [], chat_template=CHATML_JINJA)
    auto, named = resolve_template("hf", tok), ChatTemplate.get("chatml")
    msgs = [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]
    assert auto.encode(msgs, tok) == named.encode(msgs, tok)
    for mask in ("assistant_no_eos", "legacy_drop_first"):
        with pytest.raises(ValueError, match="empty assistant reply has no target tokens"):
            auto.encode(msgs, tok, loss_mask=mask)
    with pytest.raises(ValueError, match="no target tokens"):
        auto.encode(msgs[:1], tok)
    with pytest.raises(ValueError, match="unknown loss_mask"):
        auto.encode(msgs, tok, loss_mask="everything")


# ------------------------------------------------------------------ (b) the 12 real templates
def _think_answer(c: str, lstrip: bool = True) -> str:
    if "</think>" not in c:
        return c
    a = c.split("</think>")[-1]
    return a.lstrip("\n") if lstrip else a


def _think_rendered(c: str) -> str:
    """Qwen3/minimind's layout for a reply with reasoning (the scaffold alone is not the model's)."""
    if "</think>" not in c:
        return c.lstrip("\n")
    reasoning = c.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + _think_answer(c)


LLAMA = (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"], [])
QWEN = (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], ["<tool_call>", "</tool_call>", "<think>", "</think>"])
# file stem -> (special tokens, added text tokens, eos, bos, end-of-turn, rendered reply(content, is_last), refusal of a system message)
MODELS = {
    "meta-llama-Llama-3.1-8B-Instruct": (*LLAMA, "<|eot_id|>", "<|begin_of_text|>", "<|eot_id|>", lambda c, last: c.strip(), None),
    "meta-llama-Llama-3.2-3B-Instruct": (*LLAMA, "<|eot_id|>", "<|begin_of_text|>", "<|eot_id|>", lambda c, last: c.strip(), None),
    "Qwen-Qwen2.5-7B-Instruct": (*QWEN, "<|im_end|>", None, "<|im_end|>", lambda c, last: c, None),
    "Qwen-Qwen3-0.6B": (*QWEN, "<|im_end|>", None, "<|im_end|>", lambda c, last: _think_rendered(c) if last else _think_answer(c), None),
    "Qwen-QwQ-32B": (*QWEN, "<|im_end|>", None, "<|im_end|>", lambda c, last: c if last else _think_answer(c), None),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": (
        ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"], ["<think>", "</think>"],
        "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", lambda c, last: _think_answer(c, lstrip=False), None,
    ),
    "google-gemma-2-2b-it": (
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], [], "<eos>", "<bos>", "<end_of_turn>",
        lambda c, last: c.strip(), "System role not supported",
    ),
    "microsoft-Phi-3.5-mini-instruct": (
        ["<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"], [], "<|endoftext|>", "<s>", "<|end|>", lambda c, last: c, None,
    ),
    "mistralai-Mistral-Nemo-Instruct-2407": (
        ["<s>", "</s>", "[INST]", "[/INST]"], [], "</s>", "<s>", "</s>", lambda c, last: c, "drops or rewrites this system message",
    ),
    "ibm-granite-granite-3.3-2B-Instruct": (
        ["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"], [], "<|end_of_text|>", None, "<|end_of_text|>", lambda c, last: c, None,
    ),
    "HuggingFaceTB-SmolLM3-3B": (*QWEN, "<|im_end|>", None, "<|im_end|>", lambda c, last: c.lstrip("\n"), None),
    "jingyaogong-minimind": (*QWEN, "<|im_end|>", None, "<|im_end|>", lambda c, last: _think_rendered(c), None),
}


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
    special, plain, eos, bos, *_ = MODELS[stem]
    tok = _with_tokens(base, special, plain, eos=eos, bos=bos, chat_template=source)
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tok.backend.to_str()),
        chat_template=source,
        **tok.special_tokens_map,
    )
    return tok, hf


@pytest.mark.parametrize("stem", sorted(MODELS))
def test_real_template_matches_transformers_and_masks_each_reply(
    base: Tokenizer, shared_data: Path, fixed_today: None, stem: str
) -> None:
    tok, hf = _model(base, shared_data, stem)
    *_, eot, rendered_reply, refusal = MODELS[stem]
    template = resolve_template("auto", tok)
    assert tok.decode([template.stop_token_id(tok)]) == eot
    for name, msgs in CONVERSATIONS.items():
        if refusal and any(m["role"] == "system" for m in msgs):
            with pytest.raises(ValueError, match=refusal):
                template.encode(msgs, tok)
            continue
        out = template.encode(msgs, tok)
        expected_ids = hf.apply_chat_template(msgs, tokenize=True, date_string=DEFAULT_DATE_STRING, return_dict=False)
        assert out["input_ids"] == expected_ids, (stem, name)
        replies = [(i, m["content"]) for i, m in enumerate(msgs) if m["role"] == "assistant"]
        last = replies[-1][0]
        runs = labelled_runs(out["labels"])
        assert len(runs) == len(replies), (stem, name)
        for (a, b), (i, content) in zip(runs, replies):
            assert out["labels"][a:b] == out["input_ids"][a:b]
            assert tok.decode(out["input_ids"][a:b]) == rendered_reply(content, i == last) + eot, (stem, name, i)
        prompt = template.encode_prompt(msgs[:-1], tok)
        assert prompt == hf.apply_chat_template(
            msgs[:-1], tokenize=True, add_generation_prompt=True, date_string=DEFAULT_DATE_STRING, return_dict=False
        )


def test_minimind_folder_template_matches_its_file(shared_data: Path, fixed_today: None) -> None:
    """The real minimind folder: template read from tokenizer_config.json, its own tokens."""
    tok = Tokenizer.from_file(shared_data / "minimind")
    assert tok.chat_template == (shared_data / "chat_templates" / "jingyaogong-minimind.jinja").read_text(encoding="utf-8")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(shared_data / "minimind"))
    template = resolve_template("auto", tok)
    for name, msgs in CONVERSATIONS.items():
        out = template.encode(msgs, tok)
        assert out["input_ids"] == hf.apply_chat_template(msgs, tokenize=True, return_dict=False)
        texts = [tok.decode(out["input_ids"][a:b]) for a, b in labelled_runs(out["labels"])]
        expected = [_think_rendered(m["content"]) + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
        if name == "system_multi":
            # minimind's BPE merges "\n " across the scaffold/reply boundary ("\n\n" + "  Blue"):
            # a token straddling a reply's start carries reply text, so it is labelled.
            expected[-1] = "\n" + expected[-1]
            ids, offsets = tok.encode_rendered(template.render(msgs, tok))
            straddling = next(i for i, (a, b) in enumerate(offsets) if tok.id_to_token(ids[i]) == "ĊĠ")
            assert out["labels"][straddling] == ids[straddling] and out["labels"][straddling - 1] == I
        assert texts == expected, name


# ------------------------------------------------------------------ (c) PITFALLS behaviours
def _real(base: Tokenizer, shared_data: Path, stem: str) -> tuple[Tokenizer, HFChatTemplate]:
    source = (shared_data / "chat_templates" / f"{stem}.jinja").read_text(encoding="utf-8")
    special, plain, eos, bos, *_ = MODELS[stem]
    tok = _with_tokens(base, special, plain, eos=eos, bos=bos, chat_template=source)
    return tok, resolve_template("auto", tok)


def _labelled_texts(tok: Tokenizer, out: dict) -> list[str]:
    return [tok.decode(out["input_ids"][a:b]) for a, b in labelled_runs(out["labels"])]


def test_not_prefix_stable_templates_mask_the_full_rendering(base: Tokenizer, shared_data: Path) -> None:
    msgs = CONVERSATIONS["think_multi"]
    for stem in ("Qwen-Qwen3-0.6B", "Qwen-QwQ-32B", "microsoft-Phi-3.5-mini-instruct"):
        tok, template = _real(base, shared_data, stem)
        first = template.render(msgs[:2], tok)
        full = template.render(msgs, tok)
        assert not full.startswith(first), stem  # the premise: prefix rendering differs
        out = template.encode(msgs, tok)
        assert len(labelled_runs(out["labels"])) == 2
    # QwQ: the first reply's reasoning is dropped from history, so it is not trained; the last keeps its own.
    tok, template = _real(base, shared_data, "Qwen-QwQ-32B")
    assert _labelled_texts(tok, template.encode(msgs, tok)) == [
        "It is 4.<|im_end|>",
        "<think>three and three</think>It is 6.<|im_end|>",
    ]


def test_inserted_empty_think_block_is_not_labelled(base: Tokenizer, shared_data: Path) -> None:
    msgs = CONVERSATIONS["single"]
    for stem in ("Qwen-Qwen3-0.6B", "jingyaogong-minimind"):
        tok, template = _real(base, shared_data, stem)
        text = template.render(msgs, tok)
        assert "<think>\n\n</think>\n\n2+2 is 4." in text  # the scaffold is rendered...
        out = template.encode(msgs, tok)
        assert _labelled_texts(tok, out) == ["2+2 is 4.<|im_end|>"]  # ...but is context, not target
        think = tok.token_to_id("<think>")
        assert think in out["input_ids"] and all(
            lab == I for t, lab in zip(out["input_ids"], out["labels"]) if t == think
        )
    # SmolLM3 in no-think mode inserts "<think>\n\n</think>\n" between header and reply.
    tok, template = _real(base, shared_data, "HuggingFaceTB-SmolLM3-3B")
    no_think = HFChatTemplate(tok.chat_template, template_kwargs={"enable_thinking": False})
    assert "<think>\n\n</think>\n2+2 is 4." in no_think.render(msgs, tok)
    assert _labelled_texts(tok, no_think.encode(msgs, tok)) == ["2+2 is 4.<|im_end|>"]


def test_reasoning_the_model_wrote_is_trained_where_rendered(base: Tokenizer, shared_data: Path) -> None:
    tok, template = _real(base, shared_data, "Qwen-Qwen3-0.6B")
    msgs = CONVERSATIONS["think_multi"]
    assert _labelled_texts(tok, template.encode(msgs, tok)) == [
        "It is 4.<|im_end|>",  # history: Qwen3 drops the reasoning
        "<think>\nthree and three\n</think>\n\nIt is 6.<|im_end|>",  # final turn: reformatted, still the model's
    ]
    tok, template = _real(base, shared_data, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")
    assert _labelled_texts(tok, template.encode(msgs, tok)) == [
        "\n\nIt is 4.<｜end▁of▁sentence｜>",
        "It is 6.<｜end▁of▁sentence｜>",
    ]


def test_trimmed_content_and_non_ascii_markers(base: Tokenizer, shared_data: Path) -> None:
    msgs = CONVERSATIONS["system_multi"]
    tok, template = _real(base, shared_data, "meta-llama-Llama-3.1-8B-Instruct")
    text = template.render(msgs, tok)
    assert "Today Date: 26 Jul 2024" in text and "Blue, I think.<|eot_id|>" in text
    assert _labelled_texts(tok, template.encode(msgs, tok))[-1] == "Blue, I think.<|eot_id|>"
    pinned = HFChatTemplate(tok.chat_template, date_string="01 Jan 2025")
    assert "Today Date: 01 Jan 2025" in pinned.render(msgs, tok)

    tok, template = _real(base, shared_data, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B")
    msgs = CONVERSATIONS["non_ascii"]
    out = template.encode(msgs, tok)
    eot = tok.token_to_id("<｜end▁of▁sentence｜>")
    assert template.stop_token_id(tok) == eot
    assert [out["input_ids"][b - 1] for _, b in labelled_runs(out["labels"])] == [eot, eot]
    assert _labelled_texts(tok, out) == [m["content"] + "<｜end▁of▁sentence｜>" for m in msgs if m["role"] == "assistant"]


def test_every_loss_mask_on_a_real_template(base: Tokenizer, shared_data: Path) -> None:
    tok, template = _real(base, shared_data, "Qwen-Qwen2.5-7B-Instruct")
    msgs = CONVERSATIONS["system_multi"]
    full = template.encode(msgs, tok)
    runs = labelled_runs(full["labels"])
    newline = tok.encode("\n")
    eot = tok.token_to_id("<|im_end|>")
    by_mask = {m: template.encode(msgs, tok, loss_mask=m) for m in LOSS_MASKS}
    assert all(o["input_ids"] == full["input_ids"] for o in by_mask.values())
    assert by_mask["all"]["labels"] == full["input_ids"]
    assert labelled_runs(by_mask["last_assistant"]["labels"]) == runs[-1:]
    assert labelled_runs(by_mask["assistant_no_eos"]["labels"]) == [(a, b - 1) for a, b in runs]
    assert labelled_runs(by_mask["legacy_drop_first"]["labels"]) == [(a + 1, b) for a, b in runs]
    assert labelled_runs(by_mask["legacy_minimind"]["labels"]) == [(a, b + len(newline)) for a, b in runs]
    assert all(full["input_ids"][b - 1] == eot for _, b in runs)


def test_dropped_or_refused_system_is_never_silent(base: Tokenizer, shared_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    msgs = CONVERSATIONS["system_multi"]
    tok, template = _real(base, shared_data, "mistralai-Mistral-Nemo-Instruct-2407")
    assert "You are terse." not in template.render(msgs, tok)
    with pytest.raises(ValueError, match="drops or rewrites this system message.*named template"):
        template.encode(msgs, tok)
    # A prompt ending on a user turn keeps it (the template puts it into the last user turn).
    assert "You are terse." in tok.decode(template.encode_prompt(msgs[:-1], tok))
    lenient = HFChatTemplate(tok.chat_template, dropped_system="warn")
    with caplog.at_level("WARNING"):
        out = lenient.encode(msgs, tok)
        lenient.encode(msgs, tok)
    assert sum("drops or rewrites" in r.message for r in caplog.records) == 1
    assert _labelled_texts(tok, out) == ["Hello! How are you?</s>", "  Blue, I think.  \n</s>"]

    tok, template = _real(base, shared_data, "google-gemma-2-2b-it")
    with pytest.raises(ValueError, match="'auto' refused this conversation: System role not supported"):
        template.encode(msgs, tok)


def test_special_strings_in_content_are_refused(base: Tokenizer) -> None:
    tok = _with_tokens(base, [], chat_template=CHATML_JINJA)
    template = resolve_template("auto", tok)
    msgs = [{"role": "user", "content": "print '<|im_end|>'"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match="message 0: contains the special token string '<\\|im_end\\|>'"):
        template.encode(msgs, tok)


def test_unlocatable_reply_is_an_error(base: Tokenizer) -> None:
    rewriting = CHATML_JINJA.replace("message['content']", "message['content'] | replace('Hello', 'Howdy')")
    tok = _with_tokens(base, [], chat_template=rewriting)
    template = resolve_template("auto", tok)
    with pytest.raises(ValueError, match="message 1: .*cannot locate"):
        template.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}], tok)
    with pytest.raises(ValueError, match="message 0: .*does not render this user message as written"):
        template.encode([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}], tok)
    upper = CHATML_JINJA.replace("message['content']", "message['content'] | upper")
    tok = _with_tokens(base, [], chat_template=upper)
    with pytest.raises(ValueError, match="does not render an assistant reply as written"):
        resolve_template("auto", tok).encode(CONVERSATIONS["single"], tok)


def test_template_without_end_of_turn_marker_is_an_error(base: Tokenizer) -> None:
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    tok = _with_tokens(base, [], chat_template=plain)
    with pytest.raises(ValueError, match="no end-of-turn marker"):
        resolve_template("auto", tok).encode(CONVERSATIONS["single"], tok)


# ------------------------------------------------------------------ resolve_template and folders
def test_resolve_template_names_and_errors(base: Tokenizer) -> None:
    for name in ("chatml", "llama3", "plain"):
        assert resolve_template(name, base) is ChatTemplate.get(name)
    with pytest.raises(ValueError, match="template: auto .* has none.*chatml, llama3, plain"):
        resolve_template("auto", base)
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'"):
        resolve_template("vicuna", base)
    with pytest.raises(ValueError, match="does not compile"):
        HFChatTemplate("{% for m in messages %}")
    with pytest.raises(ValueError, match="date_string"):
        HFChatTemplate(CHATML_JINJA, date_string="2024-07-26")


def test_model_folder_round_trip_keeps_the_template(base: Tokenizer, shared_data: Path, tmp_path: Path) -> None:
    tok, template = _real(base, shared_data, "meta-llama-Llama-3.2-3B-Instruct")
    copy = Tokenizer.from_file(tok.save(tmp_path / "saved"))
    assert (copy.chat_template, copy.bos_token, copy.eos_token) == (tok.chat_template, "<|begin_of_text|>", "<|eot_id|>")
    msgs = CONVERSATIONS["system_multi"]
    assert resolve_template("auto", copy).encode(msgs, copy) == template.encode(msgs, tok)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert hf.apply_chat_template(msgs, tokenize=True, date_string=DEFAULT_DATE_STRING, return_dict=False) == (
        template.encode(msgs, tok)["input_ids"]
    )


@pytest.mark.parametrize("name", ChatTemplate.names())
def test_named_template_as_jinja_round_trips(base: Tokenizer, name: str) -> None:
    """`ChatTemplate.jinja` (what an export writes) renders like the named template, and
    masks like it. `plain` writes the same text, but its headers end in a space that the
    named template tokenises on its own ("System: " + "You") and a whole rendering merges
    (" You"): there the ids differ, and the token that straddles the header's space and a
    reply's first character is labelled (it carries reply text)."""
    named = ChatTemplate.get(name)
    tok = _with_tokens(base, [], chat_template=named.jinja)
    auto = resolve_template("auto", tok)
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tok.backend.to_str()), chat_template=named.jinja, **tok.special_tokens_map
    )
    straddled = 0
    for msgs in CONVERSATIONS.values():
        if name == "plain":
            texts = [tok.decode(auto.encode(msgs, tok)["input_ids"][a:b]) for a, b in labelled_runs(auto.encode(msgs, tok)["labels"])]
            replies = [m["content"] + tok.eos_token for m in msgs if m["role"] == "assistant"]
            assert len(texts) == len(replies)
            assert all(t in (r, " " + r) for t, r in zip(texts, replies)), texts
            straddled += sum(t == " " + r for t, r in zip(texts, replies))  # " Hello": header space + reply
        else:
            for mask in LOSS_MASKS:
                assert auto.encode(msgs, tok, loss_mask=mask) == named.encode(msgs, tok, loss_mask=mask), (name, mask)
            assert auto.encode_prompt(msgs[:-1], tok) == named.encode_prompt(msgs[:-1], tok)
        for gen in (False, True):
            shown = msgs[:-1] if gen else msgs
            text = named.render(shown, add_generation_prompt=gen, eos_token=tok.eos_token)
            assert hf.apply_chat_template(shown, tokenize=False, add_generation_prompt=gen) == text
    assert auto.stop_token_id(tok) == named.stop_token_id(tok)
    assert (straddled > 0) == (name == "plain")


def test_template_pickles(base: Tokenizer) -> None:
    import pickle

    tok = _with_tokens(base, [], chat_template=CHATML_JINJA)
    template = HFChatTemplate(CHATML_JINJA, date_string="01 Jan 2025", dropped_system="warn")
    msgs = CONVERSATIONS["system_multi"]
    expected = template.encode(msgs, tok)
    copy = pickle.loads(pickle.dumps(template))
    assert (copy.date_string, copy.dropped_system, copy.jinja) == ("01 Jan 2025", "warn", CHATML_JINJA)
    assert copy.encode(msgs, pickle.loads(pickle.dumps(tok))) == expected


def _real_conversations(shared_data: Path, per_file: int) -> list[list[dict]]:
    """Multi-turn sharegpt data (tool calls, English and Chinese preference prompts + chosen)."""
    import json

    roles = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant", "observation": "user"}
    lf = shared_data / "llamafactory"
    out = []
    for name in ("glaive_toolcall_en_demo.json", "dpo_en_demo.json", "dpo_zh_demo.json"):
        for ex in json.loads((lf / name).read_text(encoding="utf-8"))[:per_file]:
            turns = ex["conversations"] + ([ex["chosen"]] if "chosen" in ex else [])
            out.append([{"role": roles[t["from"]], "content": t["value"]} for t in turns])
    return out


@pytest.mark.parametrize("stem", sorted(MODELS))
def test_real_conversations_every_reply_exact(base: Tokenizer, shared_data: Path, stem: str) -> None:
    """Real multi-turn data: each reply labelled exactly as rendered, or the conversation refused by name.
    (All 900 conversations x 12 templates were checked the same way once: every reply exact.)"""
    tok, template = _real(base, shared_data, stem)
    *_, eot, rendered_reply, refusal = MODELS[stem]
    encoded = 0
    for msgs in _real_conversations(shared_data, 20):
        if refusal and msgs[0]["role"] == "system":
            with pytest.raises(ValueError, match=refusal):
                template.encode(msgs, tok)
            continue
        out = template.encode(msgs, tok)
        replies = [(i, m["content"]) for i, m in enumerate(msgs) if m["role"] == "assistant"]
        expected = [rendered_reply(c, i == replies[-1][0]) + eot for i, c in replies]
        assert _labelled_texts(tok, out) == expected
        encoded += 1
    assert encoded >= 40


def test_folder_written_by_transformers_is_read_whole(base: Tokenizer, shared_data: Path, tmp_path: Path, fixed_today: None) -> None:
    """`save_pretrained` (chat_template.jinja beside tokenizer_config.json) -> from_file -> template: auto."""
    stem = "Qwen-Qwen3-0.6B"
    tok, hf = _model(base, shared_data, stem)
    hf.save_pretrained(str(tmp_path))
    assert (tmp_path / "chat_template.jinja").is_file()
    loaded = Tokenizer.from_file(tmp_path)
    assert loaded.chat_template == tok.chat_template and loaded.eos_token == "<|im_end|>"
    template = resolve_template("auto", loaded)
    for msgs in CONVERSATIONS.values():
        assert template.encode(msgs, loaded)["input_ids"] == hf.apply_chat_template(msgs, tokenize=True, return_dict=False)
    assert loaded.decode([template.stop_token_id(loaded)]) == "<|im_end|>"
