"""StreamingPretrainData: PretrainData's rows when read in order, a seeded shuffle that keeps every row once per
epoch, disjoint ranks, exact mixing proportions, memory bounded by the shuffle window, refused order changes."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from llmstages.data import PretrainData, StreamingPretrainData
from llmstages.data.base import default_tokenizer
from llmstages.data.loader import ResumeMismatch
from llmstages.data.shards import ShardError, prepare_shards

SEQ = 16


def unique_docs(prefix: str, n: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> list[str]:
    # random words: every stretch of SEQ tokens is distinct, so a row's tokens identify it (asserted below)
    rng = np.random.default_rng(sum(map(ord, prefix)))
    letters = np.array(list(alphabet))
    return [" ".join("".join(rng.choice(letters, 4)) for _ in range(6)) for _ in range(n)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    default_tokenizer(path)
    return path


def prepared(tmp_path, cache, name: str, docs: list[str], shard_tokens: int = SEQ * 40):
    text = tmp_path / f"{name}.txt"
    text.write_text("\n".join(docs) + "\n")
    return prepare_shards([text], default_tokenizer(cache), tmp_path / name, shard_tokens=shard_tokens,
                          workers=1, progress=False), text


def data(cache, sources, **kw) -> StreamingPretrainData:
    module = StreamingPretrainData(sources=sources, seq_len=SEQ, cache_dir=str(cache), **{"val_fraction": 0, **kw})
    module.setup("fit")
    return module


def rows(dataset, world: int = 1, rank: int = 0, epoch: int = 0) -> list[tuple[int, ...]]:
    n = len(dataset) // world
    return [tuple(dataset[(epoch * n + i) * world + rank]["input_ids"].tolist()) for i in range(n)]


def test_read_in_order_it_gives_pretrain_datas_rows(tmp_path, cache):
    folder, text = prepared(tmp_path, cache, "web", unique_docs("web", 300), shard_tokens=1000)  # rows span shards
    stream = data(cache, str(folder), shuffle=False)
    reference = PretrainData(files=[str(text)], seq_len=SEQ, cache_dir=str(cache), val_fraction=0)
    reference.setup("fit")
    assert len(stream.train_set) == len(reference.train_set)
    for i in range(len(stream.train_set)):
        a, b = stream.train_set[i], reference.train_set[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i


def test_shuffle_is_seeded_and_every_epoch_holds_each_token_once(tmp_path, cache):
    folder, _ = prepared(tmp_path, cache, "web", unique_docs("web", 300))  # the short last shard lands mid-epoch
    in_order = rows(data(cache, str(folder), shuffle=False).train_set)
    assert len(set(in_order)) == len(in_order) > 100
    everything = Counter(t for r in in_order for t in r)
    shuffled = data(cache, str(folder), shuffle_buffer=8, seed=1).train_set
    epoch0, epoch1 = rows(shuffled, epoch=0), rows(shuffled, epoch=1)
    for epoch in (epoch0, epoch1):
        tokens = Counter(t for r in epoch for t in r)
        assert len(set(epoch)) == len(epoch) == len(in_order)
        assert not tokens - everything or sum((tokens - everything).values()) < SEQ  # only the remainder moves
    assert epoch0 != in_order and epoch1 != epoch0
    assert rows(data(cache, str(folder), shuffle_buffer=8, seed=1).train_set) == epoch0  # same seed, same order
    assert rows(data(cache, str(folder), shuffle_buffer=8, seed=2).train_set) != epoch0


def test_ranks_get_disjoint_equal_parts_of_the_epoch(tmp_path, cache):
    folder, _ = prepared(tmp_path, cache, "web", unique_docs("web", 300))
    module = data(cache, str(folder), shuffle_buffer=8)
    epoch_rows = set(rows(module.train_set))  # one rank: the whole epoch
    parts = []
    for rank in range(3):
        module.trainer = None
        module.train_set = None
        module._world = lambda rank=rank: (3, rank)  # what a 3-rank trainer gives
        module.setup("fit")
        parts.append(rows(module.train_set, world=3, rank=rank))
    assert len({len(p) for p in parts}) == 1
    flat = [r for p in parts for r in p]
    assert len(set(flat)) == len(flat) == 3 * (len(epoch_rows) // 3) and set(flat) <= epoch_rows


def test_mixing_gives_exact_counts_in_every_window(tmp_path, cache):
    web, _ = prepared(tmp_path, cache, "web", unique_docs("web", 400, "abcdefghijklm"))
    code, _ = prepared(tmp_path, cache, "code", unique_docs("code", 150, "nopqrstuvwxyz"))
    mixed = data(cache, {"web": str(web), "code": str(code)}, weights={"web": 0.7, "code": 0.3}, shuffle_buffer=8)
    tokenizer = mixed.tokenizer
    code_rows = mixed.train_set.orders[1].rows
    stream = [mixed.train_set[i]["input_ids"].tolist() for i in range(3 * len(mixed.train_set))]  # code repeats

    def source(row):  # the two corpora share no letter
        text = tokenizer.decode(row, skip_special_tokens=True)
        web_letters, code_letters = set(text) & set("abcdefghijklm"), set(text) & set("nopqrstuvwxyz")
        assert bool(web_letters) != bool(code_letters), text
        return "web" if web_letters else "code"

    sources = [source(r) for r in stream]
    for start in range(0, len(sources) - 9, 10):
        assert Counter(sources[start : start + 10]) == {"web": 7, "code": 3}, start
    code_seen = [tuple(r) for r, s in zip(stream, sources) if s == "code"]
    assert len(set(code_seen[:code_rows])) == code_rows  # each code row once before code repeats
    assert len(code_seen) > code_rows


def test_memory_is_one_window_per_source(tmp_path, cache):
    folder, _ = prepared(tmp_path, cache, "web", unique_docs("web", 600))
    module = data(cache, str(folder), shuffle_buffer=8)
    dataset, shard_set = module.train_set, module.train_set.sets[0]
    reads = []
    original = shard_set.read
    shard_set.read = lambda shard, a, b: reads.append(b - a) or original(shard, a, b)
    for i in range(len(dataset)):
        dataset[i]
        assert dataset.buffered_tokens <= 8 * SEQ
    assert max(reads) <= 8 * SEQ
    assert sum(reads) == len(dataset) * SEQ  # every token of the epoch read exactly once, never the whole corpus at once


def test_a_resume_that_changes_the_order_is_refused_naming_the_values(tmp_path, cache):
    web, _ = prepared(tmp_path, cache, "web", unique_docs("web", 300))
    code, _ = prepared(tmp_path, cache, "code", unique_docs("code", 300))

    def loader(batch_size=4, weights=None):
        module = data(cache, {"web": str(web), "code": str(code)}, weights=weights or {"web": 0.5, "code": 0.5},
                      batch_size=batch_size)
        return module.train_dataloader()

    saved = loader().state_dict()
    assert saved["consumed"] == 0
    with pytest.raises(ResumeMismatch, match="batch_size: 4 -> 2"):
        loader(batch_size=2).load_state_dict(saved)
    with pytest.raises(ResumeMismatch, match=r"weights: .*'web': '1/2'.* -> .*'web': '7/10'"):
        loader(weights={"web": 0.7, "code": 0.3}).load_state_dict(saved)
    loader().load_state_dict(saved)  # the same settings resume


def test_a_resumed_loader_continues_with_the_same_batches(tmp_path, cache):
    web, _ = prepared(tmp_path, cache, "web", unique_docs("web", 300))
    code, _ = prepared(tmp_path, cache, "code", unique_docs("code", 300))
    sources, weights = {"web": str(web), "code": str(code)}, {"web": 0.75, "code": 0.25}

    def batches(state=None, take=None):
        module = data(cache, sources, weights=weights, shuffle_buffer=8)
        loader = module.train_dataloader()
        if state is not None:
            loader.load_state_dict(state)
        out = []
        for batch in loader:
            module.on_before_batch_transfer(batch, 0) if module.trainer else loader.mark_consumed()
            out.append(batch["input_ids"])
            if take is not None and len(out) == take:
                return out, loader.state_dict()
        return out, loader.state_dict()

    full, _ = batches()
    head, state = batches(take=5)
    tail, _ = batches(state=state)
    assert len(full) == len(head) + len(tail)
    assert all(torch.equal(a, b) for a, b in zip(full, head + tail))


def test_shards_of_another_tokenizer_are_refused(tmp_path, cache):
    from llmstages.data.tokenizer import Tokenizer

    other = Tokenizer.train(unique_docs("x", 200), vocab_size=300, show_progress=False)
    other.save(tmp_path / "tok")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(unique_docs("t", 200)))
    folder = prepare_shards([text], other, tmp_path / "shards", workers=1, progress=False)
    with pytest.raises(ShardError, match="prepared with tokenizer"):
        data(cache, str(folder))
    index = json.loads((folder / "index.json").read_text())
    assert index["vocab_size"] == other.vocab_size
    assert len(data(cache, str(folder), tokenizer=str(tmp_path / "tok")).train_set) > 0


def test_mixture_pattern_counts_and_weights_that_cannot_be_exact():
    from llmstages.data.shards.order import Mixture

    mix = Mixture(["a", "b", "c"], {"a": 0.5, "b": 0.3, "c": 0.2})
    located = [mix.locate(k) for k in range(50)]
    for start in range(0, 50, 10):
        assert Counter(s for s, _ in located[start : start + 10]) == {0: 5, 1: 3, 2: 2}
    for s in range(3):  # each source's rows are taken in order, none skipped or repeated
        assert [j for t, j in located if t == s] == list(range(sum(1 for t, _ in located if t == s)))
    with pytest.raises(ValueError, match="common denominator"):
        Mixture(["a", "b"], {"a": 0.3331, "b": 0.6669})
    with pytest.raises(ValueError, match="missing"):
        Mixture(["a", "b"], {"a": 1.0})


def test_a_folder_without_shards_is_named(tmp_path, cache):
    with pytest.raises(ShardError, match=r"nowhere: no index\.json"):
        data(cache, str(tmp_path / "nowhere"))


def test_samplers_walk_a_ranks_positions_lazily_as_distributed_sampler_would():
    from torch.utils.data import DistributedSampler

    from llmstages.data.shards.streaming import RangeSampler

    class Sized:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    for rank in range(3):
        mine, reference = RangeSampler(Sized(12), 3, rank, 0), DistributedSampler(Sized(12), 3, rank, shuffle=False)
        assert list(mine) == list(reference)
        mine.start = 2  # resuming: the rank's first two positions were trained
        assert list(mine) == list(reference)[2:]
    huge = RangeSampler(Sized(10**12), 2, 1, 0)  # a corpus of 10^12 rows: no list of its indices
    it = iter(huge)
    assert isinstance(it, type(iter(range(0)))) and next(it) == 1 and len(huge) == 5 * 10**11
