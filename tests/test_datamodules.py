"""The three data modules end to end: batch contract, splits, shards, step counts, caches, bad input.

Modules on the embedded data share one session cache folder, so the default
tokenizer is trained once and the pretraining tokens are encoded once.
Distributed shards and gradient accumulation are exercised with a stand-in
trainer (`LightningDataModule.trainer` is a plain attribute); no process group.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmstages.data import sft as sft_module
from llmstages.data import synthetic
from llmstages.data.formats import DataFormatError
from llmstages.data import KTOData, PreferenceData, PretrainData, PromptData, SFTData
from llmstages.errors import UserError, is_user_error
from llmstages.data.packing import IGNORE_INDEX, truncate
from llmstages.data.tokenizer import Tokenizer
from llmstages.losses import count_sequences, count_targets

X = IGNORE_INDEX
SEQ = 128
STEP_KEYS = {"num_step_tokens", "num_step_sequences"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tok_path(cache: Path) -> str:
    return str(cache / "default-tokenizer-1024")


@pytest.fixture(scope="session")
def sft_docs(cache: Path) -> SFTData:
    module = SFTData(seq_len=SEQ, cache_dir=str(cache))
    module.setup("fit")
    return module


@pytest.fixture(scope="session")
def sft_none(cache: Path) -> SFTData:
    module = SFTData(seq_len=SEQ, packing="none", cache_dir=str(cache))
    module.setup("fit")
    return module


@pytest.fixture(scope="session")
def pref(cache: Path) -> PreferenceData:
    module = PreferenceData(seq_len=SEQ, cache_dir=str(cache))
    module.setup("fit")
    return module


@pytest.fixture(scope="session")
def pretrain(cache: Path) -> PretrainData:
    module = PretrainData(seq_len=SEQ, cache_dir=str(cache))
    module.setup("fit")
    return module


def _fake_trainer(world: int = 1, rank: int = 0, accumulate: int = 1) -> SimpleNamespace:
    return SimpleNamespace(world_size=world, global_rank=rank, accumulate_grad_batches=accumulate)


def _key(example: dict) -> tuple:
    return tuple(example["input_ids"]), tuple(example["labels"])


# --------------------------------------------------------------------------- contract checks


def _check_common(batch: dict, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels, pos = (batch[f"{prefix}{k}"] for k in ("input_ids", "labels", "position_ids"))
    assert ids.dim() == 2 and ids.shape == labels.shape == pos.shape
    assert ids.shape[1] <= SEQ
    assert ids.dtype == labels.dtype == pos.dtype == torch.long
    assert bool(((labels == ids) | (labels == X)).all()), "a label is neither its input id nor -100"
    return ids, labels


def _check_right_padded(batch: dict, pad_id: int, prefix: str = "") -> list[int]:
    """Padding is a suffix of pad ids with -100 labels and arange positions; returns real lengths."""
    ids, labels = _check_common(batch, prefix)
    lengths = []
    for row in range(ids.shape[0]):
        is_pad = ids[row] == pad_id
        n = int((~is_pad).sum())
        assert bool(is_pad[n:].all()) and not bool(is_pad[:n].any()), "padding is not a right suffix"
        assert bool((labels[row, n:] == X).all())
        lengths.append(n)
    assert torch.equal(batch[f"{prefix}position_ids"], torch.arange(ids.shape[1]).expand_as(ids))
    return lengths


def _check_packed(batch: dict, pad_id: int) -> None:
    ids, labels = _check_common(batch)
    assert ids.shape[1] == SEQ
    pos, docs = batch["position_ids"], batch["document_ids"]
    assert docs.shape == ids.shape and docs.dtype == torch.long
    for row in range(ids.shape[0]):
        real = docs[row] >= 0
        n = int(real.sum())
        assert bool(real[:n].all()), "padding inside a packed row"
        assert bool((ids[row, n:] == pad_id).all()) and bool((labels[row, n:] == X).all())
        assert not bool((ids[row, :n] == pad_id).any())
        d = docs[row, :n]
        starts = torch.ones(n, dtype=torch.bool)
        starts[1:] = d[1:] != d[:-1]
        assert bool((d[1:] >= d[:-1]).all()) and int(d[0]) == 0
        assert bool((pos[row, :n][starts] == 0).all())
        assert bool((pos[row, 1:n][~starts[1:]] == pos[row, : n - 1][~starts[1:]] + 1).all())
        assert bool((labels[row, :n][starts] == X).all()), "a document's first token is labelled"


# --------------------------------------------------------------------------- batch contract


def test_sft_packed_batches_follow_contract(sft_docs: SFTData) -> None:
    pad = sft_docs.tokenizer.pad_id
    assert sft_docs.tokenizer.eos_id != pad
    batches = list(sft_docs.train_dataloader())
    assert len(batches) == -(-len(sft_docs.train_set) // 8)
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids"} | STEP_KEYS
        assert batch["input_ids"].shape[0] == 8 or batch is batches[-1]
        _check_packed(batch, pad)
        # accumulate 1: the step is this micro-batch
        assert batch["num_step_tokens"].item() == count_targets(batch["labels"])
        assert batch["num_step_sequences"].item() == count_sequences(batch["labels"], batch["document_ids"])
    val = list(sft_docs.val_dataloader())
    assert val and set(val[0]) == {"input_ids", "labels", "position_ids", "document_ids"}
    for batch in val:
        _check_packed(batch, pad)
    assert sft_docs.fill_ratio > 0.9


def test_sft_none_right_pads(sft_none: SFTData) -> None:
    pad = sft_none.tokenizer.pad_id
    for batch in list(sft_none.train_dataloader())[:20]:
        assert set(batch) == {"input_ids", "labels", "position_ids"} | STEP_KEYS
        lengths = _check_right_padded(batch, pad)
        assert max(lengths) == batch["input_ids"].shape[1]  # padded to the batch's longest, not seq_len
        assert batch["num_step_sequences"].item() == batch["input_ids"].shape[0]
        # every row's first token is a template marker, never a target
        assert bool((batch["labels"][:, 0] == X).all())
    batch = next(iter(sft_none.val_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    _check_right_padded(batch, pad)


def test_preference_batches_share_the_prompt(pref: PreferenceData) -> None:
    tok = pref.tokenizer
    stop = pref.template.stop_token_id(tok)
    header = pref.template.encode_prompt([], tok)  # the assistant header alone
    seen = 0
    for batch in list(pref.train_dataloader())[:10]:
        keys = {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "labels", "position_ids")}
        assert set(batch) == keys | {"index"} | STEP_KEYS
        assert batch["index"].dtype == torch.long and batch["index"].shape == (batch["chosen_input_ids"].shape[0],)
        assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
        c_len = _check_right_padded(batch, tok.pad_id, "chosen_")
        r_len = _check_right_padded(batch, tok.pad_id, "rejected_")
        assert batch["num_step_sequences"].item() == len(c_len)
        for row in range(len(c_len)):
            spans = {}
            for side, n in (("chosen", c_len[row]), ("rejected", r_len[row])):
                ids, labels = batch[f"{side}_input_ids"][row, :n], batch[f"{side}_labels"][row, :n]
                where = (labels != X).nonzero().flatten()
                first, last = int(where[0]), int(where[-1])
                # reply labels: one contiguous run ending with the end-of-turn token, nothing after it but the separator
                assert where.tolist() == list(range(first, last + 1))
                assert int(ids[last]) == stop and n - last - 1 == len(tok.encode("\n"))
                assert ids[first - len(header) : first].tolist() == header
                spans[side] = (first, ids)
            p = spans["chosen"][0]
            assert spans["rejected"][0] == p, "chosen and rejected prompts differ in length"
            assert torch.equal(spans["chosen"][1][:p], spans["rejected"][1][:p])
            assert not torch.equal(spans["chosen"][1][p:], spans["rejected"][1][p:])
            seen += 1
    assert seen == 80


def test_pretrain_batches_follow_contract(pretrain: PretrainData) -> None:
    eos, pad = pretrain.tokenizer.eos_id, pretrain.tokenizer.pad_id
    for batch in list(pretrain.train_dataloader())[:10]:
        assert set(batch) == {"input_ids", "labels", "position_ids", "document_ids"} | STEP_KEYS
        ids, labels = _check_common(batch)
        assert ids.shape == (8, SEQ)
        assert not bool((ids == pad).any())  # rows are cut from a stream: no padding
        after_eos = torch.zeros_like(ids, dtype=torch.bool)
        after_eos[:, 1:] = ids[:, :-1] == eos
        assert torch.equal(labels == X, after_eos)
        assert bool((batch["position_ids"][after_eos] == 0).all())
        assert batch["num_step_tokens"].item() == count_targets(labels)


# --------------------------------------------------------------------------- splits


def test_split_is_deterministic_per_seed(cache: Path, sft_docs: SFTData, pref: PreferenceData) -> None:
    again = SFTData(seq_len=SEQ, cache_dir=str(cache))
    again.setup()
    assert len(again.train_set) == len(sft_docs.train_set)
    for a, b in zip(again.train_set, sft_docs.train_set):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.val_conversations == sft_docs.val_conversations
    other = SFTData(seq_len=SEQ, cache_dir=str(cache), seed=1)
    other.setup()
    assert other.val_conversations != sft_docs.val_conversations

    pref2 = PreferenceData(seq_len=SEQ, cache_dir=str(cache))
    pref2.setup()
    assert [_key(e["chosen"]) for e in pref2.val_set] == [_key(e["chosen"]) for e in pref.val_set]


def test_sft_train_and_validation_partition_the_examples(sft_none: SFTData) -> None:
    tok, template = sft_none.tokenizer, sft_none.template
    everything = Counter()
    for conv in synthetic.sft_conversations(seed=0):
        example = truncate(template.encode(conv["messages"], tok), SEQ, "right")
        if example is not None:
            everything[_key(example)] += 1
    train = Counter(_key(e) for e in sft_none.train_set)
    val = Counter(_key(e) for e in sft_none.val_set)
    assert train + val == everything  # a partition: no example in both, none lost
    assert len(sft_none.val_set) == round(sum(everything.values()) * 0.05)
    assert len(sft_none.val_conversations) == len(sft_none.val_set)


def test_preference_and_pretrain_splits_are_disjoint(pref: PreferenceData, pretrain: PretrainData) -> None:
    everything = Counter()
    for pair in synthetic.preference_pairs(seed=0):
        e = pref.encode(pair)
        everything[(_key(e["chosen"]), _key(e["rejected"]))] += 1
    split = Counter((_key(e["chosen"]), _key(e["rejected"])) for e in [*pref.train_set, *pref.val_set])
    assert split == everything and len(pref.val_set) == 50
    assert [e["index"] for e in pref.train_set] == list(range(len(pref.train_set)))

    train, val = set(pretrain.train_set.rows.tolist()), set(pretrain.val_set.rows.tolist())
    n_rows = len(pretrain.train_set) + len(pretrain.val_set)
    assert not train & val and train | val == set(range(n_rows))


# --------------------------------------------------------------------------- shards and steps


def test_ddp_shards_are_disjoint(pref: PreferenceData, sft_docs: SFTData, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(pref.train_set) % 2 == 0  # 950: DistributedSampler needs no padding
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            monkeypatch.setattr(pref, "trainer", _fake_trainer(world=2, rank=rank))
            loader = pref.train_dataloader()
            loader.sampler.set_epoch(epoch)
            seen.append([i for batch in loader for i in batch["index"].tolist()])
        a, b = set(seen[0]), set(seen[1])
        assert len(a) == len(seen[0]) == len(seen[1]) == 475
        assert not a & b and a | b == set(range(950))
    # the shuffle follows the epoch
    monkeypatch.setattr(pref, "trainer", _fake_trainer(world=2, rank=0))
    s = pref._sampler(pref.train_set, shuffle=True)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first and sorted(list(s)) != list(s)
    assert list(pref._sampler(pref.val_set, shuffle=False)) == list(range(0, 50, 2))  # rank 0's validation shard

    # odd length: both ranks still get as many rows (DDP would hang otherwise); the only overlap is the padding
    n = len(sft_docs.train_set)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(sft_docs, "trainer", _fake_trainer(world=2, rank=rank))
        shards.append(list(sft_docs._sampler(sft_docs.train_set, shuffle=True)))
    assert len(shards[0]) == len(shards[1]) == -(-n // 2)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert len(set(shards[0]) & set(shards[1])) == 2 * len(shards[0]) - n


def test_step_counts_with_accumulation(sft_docs: SFTData, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sft_docs, "trainer", _fake_trainer(accumulate=3))
    batches = list(sft_docs.train_dataloader())
    n = len(batches)
    assert n % 3 != 0  # the last step is shorter
    for start in range(0, n, 3):
        group = batches[start : start + 3]
        tokens = sum(count_targets(b["labels"]) for b in group)
        sequences = sum(count_sequences(b["labels"], b["document_ids"]) for b in group)
        for b in group:
            assert b["num_step_tokens"].item() == tokens
            assert b["num_step_sequences"].item() == sequences
    assert batches[-1]["num_step_tokens"].item() == count_targets(batches[-1]["labels"])


# --------------------------------------------------------------------------- real data: packing efficiency


def test_sft_alpaca_packing(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    messages: list[str] = []
    monkeypatch.setattr(sft_module, "rank_zero_info", messages.append)
    common = dict(
        files=[str(shared_data / "llamafactory" / "alpaca_en_demo.json")],
        tokenizer=str(shared_data / "minimind" / "tokenizer.json"),
        seq_len=1024,
        cache_dir=str(tmp_path),
    )
    packed = SFTData(packing="documents", **common)
    packed.setup()
    plain = SFTData(packing="none", **common)  # same seed, same encode path: the same examples
    plain.setup()

    assert packed.fill_ratio >= 0.95
    assert any(m.startswith("sft train:") and f"{packed.fill_ratio:.1%} real tokens" in m for m in messages)
    examples = list(plain.train_set)
    assert len(examples) == 949 and all(len(e["input_ids"]) <= 1024 for e in examples)

    docs = Counter()
    packed_targets = 0
    for row in packed.train_set:
        assert row["input_ids"].shape == (1024,)
        for d in row["document_ids"].unique().tolist():
            if d >= 0:
                docs[tuple(row["input_ids"][row["document_ids"] == d].tolist())] += 1
        packed_targets += int((row["labels"][1:] != X).sum())
    # every example exactly once, whole
    assert docs == Counter(tuple(e["input_ids"]) for e in examples)
    # packing never loses a target
    unpacked_targets = sum(sum(1 for t in e["labels"][1:] if t != X) for e in examples)
    assert packed_targets == unpacked_targets > 0


# --------------------------------------------------------------------------- pretraining token cache


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(synthetic.pretrain_corpus(n_docs=200, seed=3)) + "\n", encoding="utf-8")
    return path


def _expected_tokens(tok: Tokenizer, path: Path) -> np.ndarray:
    docs = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return np.concatenate([np.asarray(tok.encode(d) + [tok.eos_id]) for d in docs])


def _counting_encode(monkeypatch: pytest.MonkeyPatch, module: PretrainData, fail_after: int | None = None) -> list:
    """Count the documents the module encodes; optionally die after `fail_after` of them."""
    calls: list[str] = []
    real = module.tokenizer.encode_batch

    def encode_batch(texts: list[str]) -> list[list[int]]:
        for text in texts:
            calls.append(text)
            if fail_after is not None and len(calls) > fail_after:
                raise KeyboardInterrupt("killed while writing the cache")
        return real(texts)

    monkeypatch.setattr(module.tokenizer, "encode_batch", encode_batch)
    monkeypatch.setattr(module, "encode_chunk", 16)  # several chunks, so a kill leaves a partial file
    return calls


def test_token_cache_is_reused(corpus: Path, tok_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "c"
    first = PretrainData(files=[str(corpus)], tokenizer=tok_path, seq_len=32, cache_dir=str(cache_dir))
    calls = _counting_encode(monkeypatch, first)
    first.setup()
    path = first.token_cache()
    assert len(calls) == 200 and path.suffix == ".bin"
    np.testing.assert_array_equal(np.fromfile(path, dtype=np.uint16), _expected_tokens(first.tokenizer, corpus))
    past = path.stat().st_mtime_ns - 10**9
    os.utime(path, ns=(past, past))

    second = PretrainData(files=[str(corpus)], tokenizer=tok_path, seq_len=32, cache_dir=str(cache_dir))
    calls = _counting_encode(monkeypatch, second)
    second.setup()
    assert second.token_cache() == path and calls == []
    assert path.stat().st_mtime_ns == past  # not rewritten
    assert len(second.train_set) + len(second.val_set) == len(_expected_tokens(first.tokenizer, corpus)) // 32


def test_token_cache_follows_content_and_tokenizer(corpus: Path, tok_path: str, tmp_path: Path) -> None:
    cache_dir = str(tmp_path / "c")
    base = PretrainData(files=[str(corpus)], tokenizer=tok_path, seq_len=32, cache_dir=cache_dir).token_cache()

    corpus.write_text(corpus.read_text(encoding="utf-8") + "one more line\n", encoding="utf-8")
    edited = PretrainData(files=[str(corpus)], tokenizer=tok_path, seq_len=32, cache_dir=cache_dir).token_cache()
    assert edited != base and edited.exists() and base.exists()

    # two tokenizers with the same vocabulary size but different merges
    texts_a = synthetic.pretrain_corpus(n_docs=200, seed=5)
    texts_b = [t.upper() for t in texts_a]
    dirs = []
    for name, texts in (("a", texts_a), ("b", texts_b)):
        tok = Tokenizer.train(texts, vocab_size=300, show_progress=False)
        dirs.append(str(tok.save(tmp_path / name)))
    tok_a, tok_b = (Tokenizer.from_file(d) for d in dirs)
    assert tok_a.vocab_size == tok_b.vocab_size and tok_a.to_json() != tok_b.to_json()
    paths = [PretrainData(files=[str(corpus)], tokenizer=d, seq_len=32, cache_dir=cache_dir).token_cache() for d in dirs]
    assert len({*paths, edited}) == 3
    a, b = (np.fromfile(p, dtype=np.uint16) for p in paths)
    assert not np.array_equal(a, b)

    # the embedded corpus depends on the seed, so the cache does too
    e0 = PretrainData(tokenizer=tok_path, seq_len=32, cache_dir=cache_dir, seed=0).token_cache()
    e1 = PretrainData(tokenizer=tok_path, seq_len=32, cache_dir=cache_dir, seed=1).token_cache()
    assert e0 != e1


def test_killed_cache_write_is_never_used(
    corpus: Path, tok_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "c"
    killed = PretrainData(files=[str(corpus)], tokenizer=tok_path, seq_len=32, cache_dir=str(cache_dir))
    _counting_encode(monkeypatch, killed, fail_after=50)
    with pytest.raises(KeyboardInterrupt):
        killed.setup()
    assert not list(cache_dir.glob("tokens-*.bin"))
    leftovers = list(cache_dir.glob("tokens-*.tmp*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    # a stale file from another (dead) process as well
    stale = leftovers[0].with_suffix(".tmp999999")
    stale.write_bytes(b"\x01\x00" * 5000)

    fresh = PretrainData(files=[str(corpus)], tokenizer=tok_path, seq_len=32, cache_dir=str(cache_dir))
    calls = _counting_encode(monkeypatch, fresh)
    fresh.setup()
    path = fresh.token_cache()
    assert len(calls) == 200 and path.suffix == ".bin" and path.stem == leftovers[0].stem
    np.testing.assert_array_equal(np.fromfile(path, dtype=np.uint16), _expected_tokens(fresh.tokenizer, corpus))
    assert json.loads(path.with_suffix(".json").read_text())["documents"] == 200


# --------------------------------------------------------------------------- bad input


def _alpaca(instruction: str, output: str) -> str:
    return json.dumps({"instruction": instruction, "input": "", "output": output})


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = [_alpaca("add 2 and 3", "5"), _alpaca("copy: cat", "cat"), _alpaca("reverse: dog", "god")]


def _sft(path: Path, tok_path: str, cache: Path, **kw) -> SFTData:
    kw = {"seq_len": 64, "packing": "none", "val_fraction": 0.0, **kw}
    return SFTData(files=[str(path)], tokenizer=tok_path, cache_dir=str(cache), **kw)


def test_bad_record_raises_with_file_and_line(tmp_path: Path, tok_path: str, cache: Path) -> None:
    path = _write(tmp_path / "sft.jsonl", [GOOD[0], GOOD[1], '{"instruction": "x", "output": ', GOOD[2]])
    module = _sft(path, tok_path, cache)
    with pytest.raises(DataFormatError) as info:
        module.setup()
    assert info.value.path == path and info.value.index == 3 and info.value.reason == "invalid_json"
    assert f"{path}:3" in str(info.value)
    assert module.train_set is None


def test_bad_record_skipped_and_counted(tmp_path: Path, tok_path: str, cache: Path) -> None:
    lines = [GOOD[0], "not json", GOOD[1], json.dumps({"instruction": "no output"}), GOOD[2]]
    module = _sft(_write(tmp_path / "sft.jsonl", lines), tok_path, cache, on_error="skip")
    module.setup()
    assert module.skipped == Counter({"invalid_json": 1, "missing_field": 1})
    assert len(module.train_set) == 3 and module.val_set is None
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape[0] == 3


def test_every_record_bad_is_an_error(tmp_path: Path, tok_path: str, cache: Path) -> None:
    module = _sft(_write(tmp_path / "sft.jsonl", ["nope", "{", "[1, 2]"]), tok_path, cache, on_error="skip")
    with pytest.raises(DataFormatError, match="no usable records"):
        module.setup()
    assert module.train_set is None


def test_truncated_away_replies_are_dropped_and_counted(tmp_path: Path, tok_path: str, cache: Path) -> None:
    long_prompt = "please read this very long story about ana and her red cat " * 20
    path = _write(tmp_path / "sft.jsonl", [*GOOD, _alpaca(long_prompt, "ok")])
    module = _sft(path, tok_path, cache)
    module.setup()
    assert module.skipped == Counter({"reply_truncated_away": 1})
    assert len(module.train_set) == 3 and all(len(e["input_ids"]) <= 64 for e in module.train_set)

    dropping = _sft(path, tok_path, cache, truncation="drop")
    dropping.setup()
    assert dropping.skipped == Counter({"too_long_dropped": 1}) and len(dropping.train_set) == 3

    tiny = _sft(path, tok_path, cache, seq_len=8)  # even the short prompts fill 8 tokens
    with pytest.raises(ValueError, match="no usable examples left \\(reply_truncated_away: 4\\)"):
        tiny.setup()


def test_preference_bad_and_truncated_pairs_are_counted(tmp_path: Path, tok_path: str, cache: Path) -> None:
    def pair(prompt: str, chosen: str, rejected: str) -> str:
        return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected})

    lines = [pair("add 2 and 3", "5", "6"), pair("copy: cat", "cat", "cta"), "{bad", pair("x " * 200, "a", "b")]
    path = _write(tmp_path / "pref.jsonl", lines)
    module = PreferenceData(
        files=[str(path)], tokenizer=tok_path, cache_dir=str(cache), seq_len=64, val_fraction=0.0, on_error="skip"
    )
    module.setup()
    assert module.skipped == Counter({"invalid_json": 1, "reply_truncated_away": 1})
    assert len(module.train_set) == 2
    strict = PreferenceData(files=[str(path)], tokenizer=tok_path, cache_dir=str(cache), seq_len=64)
    with pytest.raises(DataFormatError, match=":3: invalid JSON"):
        strict.setup()


def test_left_truncation_cuts_one_prompt_for_both_sides(tmp_path: Path, tok_path: str, cache: Path) -> None:
    """DPO must compare two replies to the same context, even after truncation."""
    story = "please read this very long story about ana and her red cat " * 6
    line = json.dumps({"prompt": story, "chosen": "ok", "rejected": "a much longer wrong reply about a dog"})
    path = _write(tmp_path / "pref.jsonl", [line])
    module = PreferenceData(
        files=[str(path)], tokenizer=tok_path, cache_dir=str(cache), seq_len=48, val_fraction=0.0, truncation="left"
    )
    module.setup()
    item = module.train_set[0]
    chosen, rejected = item["chosen"], item["rejected"]
    prompt_c = chosen["labels"].index(next(t for t in chosen["labels"] if t != -100))
    prompt_r = rejected["labels"].index(next(t for t in rejected["labels"] if t != -100))
    assert chosen["input_ids"][:prompt_c] == rejected["input_ids"][:prompt_r]  # same prompt tokens
    assert max(len(chosen["input_ids"]), len(rejected["input_ids"])) == 48
    assert module.tokenizer.decode(rejected["input_ids"][prompt_r:], skip_special_tokens=True).strip().endswith("dog")


def test_unknown_options_fail_at_construction(tok_path: str, cache: Path) -> None:
    with pytest.raises(ValueError, match="unknown loss_mask 'assistants'"):
        SFTData(tokenizer=tok_path, cache_dir=str(cache), loss_mask="assistants")
    with pytest.raises(ValueError, match="unknown truncation 'middle'"):
        PreferenceData(tokenizer=tok_path, cache_dir=str(cache), truncation="middle")


def test_multi_turn_completions_label_only_their_assistant_turns(tmp_path: Path, tok_path: str, cache: Path) -> None:
    """read_preference accepts chosen/rejected as assistant-user-assistant lists; the module
    encodes them after the shared prompt, with only the completion's assistant turns labelled."""
    turn = lambda role, text: {"role": role, "content": text}  # noqa: E731
    record = {
        "prompt": [turn("user", "add 2 and 3"), turn("assistant", "5"), turn("user", "and 4 more?")],
        "chosen": [turn("assistant", "9"), turn("user", "sure?"), turn("assistant", "yes")],
        "rejected": [turn("assistant", "8")],
    }
    path = _write(tmp_path / "pref.jsonl", [json.dumps(record)])
    module = PreferenceData(files=[str(path)], tokenizer=tok_path, cache_dir=str(cache), seq_len=128, val_fraction=0.0)
    module.setup()
    chosen = module.train_set[0]["chosen"]
    whole = module.template.encode(record["prompt"] + record["chosen"], module.tokenizer)
    prompt_len = len(module.template.encode_prompt(record["prompt"], module.tokenizer))
    assert chosen["input_ids"] == whole["input_ids"]
    assert chosen["labels"] == [-100] * prompt_len + whole["labels"][prompt_len:]
    labelled = [t for t, label in zip(chosen["input_ids"], chosen["labels"]) if label != -100]
    text = module.tokenizer.decode(labelled, skip_special_tokens=True)
    assert text == "9yes"  # the prompt's "5" is context, not completion


def test_template_auto_from_a_tokenizer_folder_equals_the_named_template(cache: Path, tmp_path: Path) -> None:
    """A model folder's own Jinja chat template (template: auto) trains exactly the tokens the named template does."""
    from llmstages.data.chat import ChatTemplate

    tokenizer = Tokenizer.from_file(cache / "default-tokenizer-1024")
    tokenizer.chat_template = ChatTemplate.get("chatml").jinja
    folder = tokenizer.save(tmp_path / "model")
    common = dict(cache_dir=str(cache), seq_len=128, packing="none")
    for cls in (SFTData, PreferenceData):
        named = cls(template="chatml", **{k: v for k, v in common.items() if cls is SFTData or k != "packing"})
        auto = cls(template="auto", tokenizer=str(folder), **{k: v for k, v in common.items() if cls is SFTData or k != "packing"})
        named.setup()
        auto.setup()
        assert len(named.train_set) == len(auto.train_set) > 0
        for i in range(0, len(named.train_set), 97):
            a, b = named.train_set[i], auto.train_set[i]
            assert a == b, (cls.__name__, i)


def test_template_auto_without_a_chat_template_names_the_option(cache: Path) -> None:
    with pytest.raises(ValueError, match="template: auto"):
        SFTData(template="auto", cache_dir=str(cache))


# a chat template refuses a record the reader accepted (the named chatml template has no format for reasoning_content)
_TURNS = ([{"role": "user", "content": "hi"}],
          [{"role": "user", "content": "6*7?"}, {"role": "assistant", "content": "42", "reasoning_content": "6*7=42"},
           {"role": "user", "content": "and 6*8?"}])
_TEMPLATE_REFUSAL_RECORDS = {
    SFTData: [{"messages": [*t, {"role": "assistant", "content": "ok"}]} for t in _TURNS],
    PreferenceData: [{"prompt": t, "chosen": "yes", "rejected": "no"} for t in _TURNS],
    PromptData: [{"prompt": t, "answer": "1"} for t in _TURNS],
    KTOData: [{"prompt": t, "completion": "ok", "label": True} for t in _TURNS],
}


@pytest.mark.parametrize("module", list(_TEMPLATE_REFUSAL_RECORDS), ids=lambda m: m.__name__)
def test_a_template_refusal_names_the_file_and_record_and_follows_on_error(module, tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _TEMPLATE_REFUSAL_RECORDS[module]))
    strict = module(files=[str(path)], seq_len=SEQ, val_fraction=0, cache_dir=str(cache))
    with pytest.raises(UserError, match=f"{path}: record 1: .*no format for 'reasoning_content'") as refused:
        strict.setup("fit")
    assert is_user_error(refused.value)  # one line and exit 2 from the command line, not a traceback
    lenient = module(files=[str(path)], seq_len=SEQ, val_fraction=0, cache_dir=str(cache), on_error="skip")
    lenient.setup("fit")
    assert lenient.skipped == Counter(template_error=1) and len(lenient.train_set) >= 1
