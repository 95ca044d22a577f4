"""Tokenizer: round trips on real text, special-token handling, pad id, save/load."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmstages.data.tokenizer import (
    CHAT_SPECIAL_TOKENS,
    DEFAULT_SPECIAL_TOKENS,
    EOS_TOKEN,
    IM_END,
    PAD_TOKEN,
    Tokenizer,
)

TRAIN_BYTES = 200_000
VOCAB = 768


@pytest.fixture(scope="module")
def shakespeare(shared_data: Path) -> str:
    return (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(shakespeare: str) -> Tokenizer:
    return Tokenizer.train([shakespeare[:TRAIN_BYTES]], VOCAB, show_progress=False)


@pytest.fixture(scope="module")
def minimind(shared_data: Path) -> Tokenizer:
    return Tokenizer.from_file(shared_data / "minimind")


@pytest.fixture(params=["trained", "minimind"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def real_texts(shared_data: Path, shakespeare: str) -> dict[str, list[str]]:
    lf = shared_data / "llamafactory"
    zh = json.loads((lf / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    c4 = [json.loads(line)["text"] for line in (lf / "c4_demo.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    glaive = json.loads((lf / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
    return {
        # Text the tokenizer was not trained on.
        "tinyshakespeare": [shakespeare[TRAIN_BYTES : TRAIN_BYTES + 100_000]],
        "alpaca_zh": [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in zh],
        "c4": c4,
        "glaive": [m["value"] for ex in glaive for m in ex["conversations"]] + [ex["tools"] for ex in glaive],
    }


@pytest.mark.parametrize("corpus", ["tinyshakespeare", "alpaca_zh", "c4", "glaive"])
def test_round_trip_real_files(tok: Tokenizer, real_texts: dict[str, list[str]], corpus: str) -> None:
    texts = real_texts[corpus]
    assert texts and sum(map(len, texts)) > 50_000
    for i, (text, ids) in enumerate(zip(texts, tok.encode_batch(texts))):
        if i < 20:
            assert ids == tok.encode(text)
        assert tok.decode(ids) == text
        assert not set(ids) & tok.special_ids
    # Documents joined, leading/trailing whitespace included.
    joined = "  " + "\n\n".join(texts[:50]) + "\t \n"
    assert tok.decode(tok.encode(joined)) == joined


PIECES = [" ", "  ", "\n", "\r\n", "\t", "😀", "👍🏽", "中文", "a", "Hello", " world", "\u00a0", "\u200b", "é", "\x00",
          *DEFAULT_SPECIAL_TOKENS, "<think>", "<|"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_round_trip_any_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.sampled_from(PIECES), max_size=30).map("".join))
def test_round_trip_whitespace_emoji_and_markers(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Marker strings inside text stay text: no special id ever comes out of encode.
    assert not set(ids) & tok.special_ids


def test_leading_space_convention(tok: Tokenizer) -> None:
    # minimind's decoder says add_prefix_space=True; neither side may add or eat a space.
    for text in ["x", " x", "  x", "x ", " ", "\nx"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("x") != tok.encode(" x")


def test_special_strings_in_text_are_not_special_ids(tok: Tokenizer) -> None:
    for marker in [EOS_TOKEN, IM_END, *(m for m in CHAT_SPECIAL_TOKENS if tok.token_to_id(m) is not None)]:
        marker_id = tok.token_to_id(marker)
        assert marker_id in tok.special_ids
        ids = tok.encode(f"say {marker} now")
        assert marker_id not in ids and len(tok.encode(marker)) > 1
        assert not set(ids) & tok.special_ids
        assert tok.decode(ids) == f"say {marker} now"
        # Being text, it survives skip_special_tokens.
        assert tok.decode(ids, skip_special_tokens=True) == f"say {marker} now"


def test_encode_adds_nothing_and_decode_can_skip_specials(trained: Tokenizer) -> None:
    assert trained.encode("") == []
    ids = trained.encode("Hello")
    assert trained.eos_id not in ids
    framed = [trained.token_to_id("<|im_start|>"), *ids, trained.eos_id, trained.pad_id]
    assert trained.decode(framed) == "<|im_start|>Hello<|endoftext|><|pad|>"
    assert trained.decode(framed, skip_special_tokens=True) == "Hello"


def test_trained_layout(trained: Tokenizer) -> None:
    assert trained.vocab_size == VOCAB == len(trained)
    assert trained.eos_id == trained.token_to_id(EOS_TOKEN) == 0
    assert trained.pad_id == trained.token_to_id(PAD_TOKEN) == 1
    ids = [trained.token_to_id(t) for t in DEFAULT_SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(ids)
    assert trained.special_ids == frozenset(ids)
    assert trained.id_to_token(trained.pad_id) == PAD_TOKEN
    assert trained.id_to_token(10**6) is None
    # Every byte is in the vocabulary (no unknown token can ever be needed).
    assert all(trained.token_to_id(c) is not None for c in tokenizers.pre_tokenizers.ByteLevel.alphabet())


def test_pad_is_distinct_from_every_other_token(tok: Tokenizer) -> None:
    assert tok.pad_id != tok.eos_id
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    assert [t for t, i in vocab.items() if i == tok.pad_id] == [PAD_TOKEN]
    assert tok.pad_id != tok.token_to_id(EOS_TOKEN)
    assert tok.pad_id in tok.special_ids


def test_minimind_import_adds_pad_and_leaves_file_alone(shared_data: Path) -> None:
    file = shared_data / "minimind" / "tokenizer.json"
    before = hashlib.sha256(file.read_bytes()).hexdigest()
    from_dir = Tokenizer.from_file(shared_data / "minimind")
    from_file = Tokenizer.from_file(file)
    assert hashlib.sha256(file.read_bytes()).hexdigest() == before
    raw = tokenizers.Tokenizer.from_file(str(file))
    assert raw.get_vocab_size(with_added_tokens=True) == 6400
    for t in (from_dir, from_file):
        # tokenizer_config.json names <|im_end|> as eos; its pad <|endoftext|> is also unk.
        assert t.eos_id == t.token_to_id("<|im_end|>") == 2
        assert t.pad_id == t.token_to_id(PAD_TOKEN) == 6400
        assert t.vocab_size == 6401
    # Ids of ordinary text are the file's own.
    text = "Hello, 世界! def f(x):\n\treturn x"
    assert from_dir.encode(text) == raw.encode(text, add_special_tokens=False).ids


def _foreign_tokenizer_json(text: str, specials: list[str]) -> str:
    """A tokenizer.json trained directly with `tokenizers` (not through our class)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = tokenizers.Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=FOREIGN_VOCAB, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    raw.train_from_iterator([text], trainer=trainer)
    return raw.to_str()


FOREIGN_VOCAB = 400


def test_import_without_distinct_pad_gets_one(shakespeare: str, tmp_path: Path) -> None:
    specials = [EOS_TOKEN, *CHAT_SPECIAL_TOKENS, "<pad>"]
    (tmp_path / "tokenizer.json").write_text(_foreign_tokenizer_json(shakespeare[:20_000], specials))
    config = tmp_path / "tokenizer_config.json"
    # No config: eos falls back to <|endoftext|>; pad is missing and gets appended.
    t = Tokenizer.from_file(tmp_path)
    assert t.eos_id == t.token_to_id(EOS_TOKEN)
    assert t.pad_id == t.token_to_id(PAD_TOKEN) == FOREIGN_VOCAB
    assert t.vocab_size == FOREIGN_VOCAB + 1
    # pad == eos, or pad == a chat marker the templates emit: a fresh pad as well.
    for pad in [EOS_TOKEN, "<|start_header_id|>"]:
        config.write_text(json.dumps({"eos_token": EOS_TOKEN, "pad_token": pad}))
        t = Tokenizer.from_file(tmp_path)
        assert t.pad_id == FOREIGN_VOCAB and t.pad_id != t.token_to_id(pad)
    # A dedicated pad named in the config (AddedToken dict form) is kept; eos from the config.
    config.write_text(json.dumps({"eos_token": {"content": IM_END}, "pad_token": {"content": "<pad>"}}))
    t = Tokenizer.from_file(tmp_path)
    assert t.eos_id == t.token_to_id(IM_END)
    assert t.pad_id == t.token_to_id("<pad>") and t.vocab_size == FOREIGN_VOCAB
    assert t.token_to_id(PAD_TOKEN) is None


def test_import_keeps_dedicated_pad(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path)
    t = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (t.pad_id, t.eos_id, t.vocab_size) == (trained.pad_id, trained.eos_id, VOCAB)


def test_import_without_eos_is_a_clear_error(shakespeare: str, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(_foreign_tokenizer_json(shakespeare[:20_000], [IM_END]))
    with pytest.raises(ValueError, match="end-of-text"):
        Tokenizer.from_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "nope")


def test_constructor_refuses_pad_equal_to_eos(trained: Tokenizer) -> None:
    with pytest.raises(ValueError, match="share id"):
        Tokenizer(tokenizers.Tokenizer.from_str(trained.backend.to_str()), pad_token=EOS_TOKEN)


def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path, shakespeare: str) -> None:
    out = tok.save(tmp_path / "tok")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == tok.eos_token and config["pad_token"] == PAD_TOKEN
    assert IM_END in config["additional_special_tokens"]
    loaded = Tokenizer.from_file(out)
    text = shakespeare[-5000:] + " 你好 😀 <|im_end|>"
    assert loaded.encode(text) == tok.encode(text)
    assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size, loaded.special_ids) == (
        tok.eos_id, tok.pad_id, tok.vocab_size, tok.special_ids
    )
    saved = json.loads((out / "tokenizer.json").read_text())
    assert saved["decoder"]["add_prefix_space"] is False
    assert saved["pre_tokenizer"]["add_prefix_space"] is False


def test_to_json_identifies_the_tokenizer(trained: Tokenizer, minimind: Tokenizer, tmp_path: Path) -> None:
    spec = json.loads(trained.to_json())
    assert (spec["eos_token"], spec["pad_token"]) == (EOS_TOKEN, PAD_TOKEN)
    assert spec["tokenizer"]["model"]["type"] == "BPE"
    assert Tokenizer.from_file(trained.save(tmp_path)).to_json() == trained.to_json()
    assert json.loads(minimind.to_json())["eos_token"] == IM_END
    other = Tokenizer.train(["a different corpus " * 50], VOCAB, show_progress=False)
    assert other.to_json() != trained.to_json()


def test_pickle_keeps_text_as_text(tok: Tokenizer) -> None:
    # DataLoader workers get pickled copies; `encode_special_tokens` is not serialised by tokenizers.
    copy = pickle.loads(pickle.dumps(tok))
    text = "a <|im_end|> b"
    assert copy.encode(text) == tok.encode(text)
    assert copy.token_to_id(IM_END) not in copy.encode(text)
    assert (copy.eos_id, copy.pad_id, copy.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)


def test_transformers_loads_saved_tokenizer(minimind: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(minimind.save(tmp_path)))
    text = "Hello, 世界!\n  def f(x): return x "
    assert hf.encode(text, add_special_tokens=False) == minimind.encode(text)
    assert (hf.pad_token_id, hf.eos_token_id, len(hf)) == (minimind.pad_id, minimind.eos_id, minimind.vocab_size)
    assert hf.decode(minimind.encode(text)) == text


def test_train_from_files_and_options(shakespeare: str, tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text(shakespeare[:50_000], encoding="utf-8")
    t = Tokenizer.train_from_files([f], 400, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False)
    assert t.vocab_size == 400
    assert [t.token_to_id(s) for s in (EOS_TOKEN, PAD_TOKEN, "<|im_start|>", "<|im_end|>")] == [0, 1, 2, 3]
    assert t.token_to_id("<|eot_id|>") is None
    # Same data through the iterator path gives the same merges.
    assert Tokenizer.train([shakespeare[:50_000]], 400, special_tokens=["<|im_start|>", "<|im_end|>"],
                           show_progress=False).encode(shakespeare[:2000]) == t.encode(shakespeare[:2000])
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], 100, show_progress=False)
    with pytest.raises(FileNotFoundError):
        Tokenizer.train_from_files([tmp_path / "missing.txt"], 400)


# ------------------------------------------------------------------ model folders: special tokens and chat template
def test_model_folder_keeps_named_tokens_and_chat_template(minimind: Tokenizer, shared_data: Path, tmp_path: Path) -> None:
    config = json.loads((shared_data / "minimind" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert minimind.chat_template == config["chat_template"]
    assert (minimind.bos_token, minimind.eos_token, minimind.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert minimind.special_tokens_map == {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": PAD_TOKEN,
    }
    copy = Tokenizer.from_file(minimind.save(tmp_path / "saved"))
    assert (copy.chat_template, copy.bos_token, copy.unk_token) == (minimind.chat_template, "<|im_start|>", "<|endoftext|>")
    assert pickle.loads(pickle.dumps(minimind)).chat_template == minimind.chat_template
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert hf.chat_template == minimind.chat_template and hf.bos_token == "<|im_start|>"


def test_trained_tokenizer_has_no_template_and_saves_none(trained: Tokenizer, tmp_path: Path) -> None:
    assert (trained.chat_template, trained.bos_token, trained.unk_token) == (None, None, None)
    config = json.loads((trained.save(tmp_path) / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and "bos_token" not in config


def test_chat_template_sources_in_transformers_order(trained: Tokenizer, tmp_path: Path) -> None:
    trained.save(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    base = json.loads(config_file.read_text())

    def write(**extra: object) -> None:
        config_file.write_text(json.dumps({**base, **extra}))

    write(chat_template="from config")
    assert Tokenizer.from_file(tmp_path).chat_template == "from config"
    write(chat_template=[{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default one"}])
    assert Tokenizer.from_file(tmp_path).chat_template == "default one"
    write(chat_template=[{"name": "tool_use", "template": "tools"}])
    with pytest.raises(ValueError, match="tokenizer_config.json: chat_template: a list of templates without a 'default'"):
        Tokenizer.from_file(tmp_path)
    write(chat_template=7)
    with pytest.raises(ValueError, match="chat_template: expected a string"):
        Tokenizer.from_file(tmp_path)
    write()
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "legacy processor file"}))
    assert Tokenizer.from_file(tmp_path).chat_template == "legacy processor file"
    write(chat_template="from config")
    (tmp_path / "chat_template.jinja").write_text("from the jinja file", encoding="utf-8")
    assert Tokenizer.from_file(tmp_path).chat_template == "from the jinja file"
    config_file.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_file(tmp_path)


def test_special_tokens_map_fills_named_tokens(shakespeare: str, tmp_path: Path) -> None:
    specials = [EOS_TOKEN, "<s>", "</s>", "<unk>", "<pad>"]
    (tmp_path / "tokenizer.json").write_text(_foreign_tokenizer_json(shakespeare[:20_000], specials))
    token_map = tmp_path / "special_tokens_map.json"
    token_map.write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}))
    config = tmp_path / "tokenizer_config.json"
    # A legacy config (no added_tokens_decoder): the map wins, as in transformers.
    config.write_text(json.dumps({"eos_token": EOS_TOKEN}))
    t = Tokenizer.from_file(tmp_path)
    assert (t.bos_token, t.eos_token, t.unk_token, t.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    # A config with added_tokens_decoder wins; the map only fills what it lacks.
    config.write_text(json.dumps({"eos_token": EOS_TOKEN, "added_tokens_decoder": {}}))
    t = Tokenizer.from_file(tmp_path)
    assert (t.bos_token, t.eos_token, t.unk_token) == ("<s>", EOS_TOKEN, "<unk>")
    # A named token the vocabulary lacks is ignored, not invented.
    token_map.write_text(json.dumps({"bos_token": "<nope>"}))
    assert Tokenizer.from_file(tmp_path).bos_token is None


def test_encode_rendered_matches_markers_and_gives_offsets(minimind: Tokenizer) -> None:
    text = "<|im_start|>user\n你好<|im_end|>\n"
    ids, offsets = minimind.encode_rendered(text)
    assert ids[0] == minimind.token_to_id("<|im_start|>") and minimind.token_to_id("<|im_end|>") in ids
    assert offsets[0] == (0, len("<|im_start|>")) and offsets[-1] == (len(text) - 1, len(text))
    assert minimind.decode(ids) == text
    # encode keeps the same string as text
    assert minimind.token_to_id("<|im_start|>") not in minimind.encode(text)
    assert "<|im_end|>" in minimind.special_tokens and "<think>" not in minimind.special_tokens
