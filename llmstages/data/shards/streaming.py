"""StreamingPretrainData: pretraining rows streamed from prepared token shards (a folder or `s3://` prefix).

Design choices:
- Memory does not grow with the corpus: a rank holds each source's `index.json` (counts per
  shard) and one shuffle window of `shuffle_buffer` rows per source, read as a few byte ranges.
- Order (`order`): shard order per source epoch from the seed, a contiguous disjoint part per
  rank, rows shuffled inside windows of `shuffle_buffer`, sources interleaved by an exact
  pattern of their weights. Packing as `PretrainData` (`packing.stream_row`: `documents` or
  `concat`), so a single source read unshuffled on one rank gives `PretrainData`'s rows.
- Exact resume: the training set is map-style over stream positions and `StreamSampler` walks
  them in order, so the existing step loader's state (epoch, micro-batches consumed) is the
  whole stream state: the source cursors, the shuffle window and the packing remainder are
  recomputed from the position. What decides the order (ranks, batch size, sources, weights,
  seq_len, shuffle window, seed) is saved beside it; a resume that changes any of it is refused
  (`loader.ResumeMismatch`, naming each value), at an epoch boundary too.
- Validation: the last `val_fraction` of each source's rows (in prepared order), never trained on.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from llmstages.data.base import StageData
from llmstages.data.batch import LMBatch
from llmstages.data.loader import ResumableSampler
from llmstages.data.packing import check_packing, stack_rows, stream_row
from llmstages.data.shards.index import ShardError, ShardSet, tokenizer_fingerprint
from llmstages.data.shards.order import Mixture, Segment, SourceOrder, split_segments, token_ranges


class StreamRows(Dataset):
    """Training rows by stream index: index = position x world + rank (what `StreamSampler` yields)."""

    def __init__(self, sets: list[ShardSet], orders: list[SourceOrder], mixture: Mixture, epoch_rows: int,
                 eos_id: int, packing: str) -> None:
        self.sets, self.orders, self.mixture, self.epoch_rows = sets, orders, mixture, epoch_rows
        self.world, self.rank, self.seq_len = orders[0].world, orders[0].rank, orders[0].seq_len
        self.eos_id, self.packing = eos_id, packing
        self._windows: list[tuple[tuple[int, int], np.ndarray] | None] = [None] * len(sets)

    def __len__(self) -> int:
        return self.world * self.epoch_rows

    def locate(self, index: int) -> tuple[int, int, int, int]:
        """(source, source epoch, window, row in the window's tokens) of a stream index."""
        rank, k = index % self.world, index // self.world
        if rank != self.rank:
            raise IndexError(f"stream index {index} belongs to rank {rank}, not {self.rank}")
        s, j = self.mixture.locate(k)
        return (s, *self.orders[s].locate(j))

    def __getitem__(self, index: int):
        s, epoch, w, row = self.locate(index)
        tokens = self.window(s, epoch, w)[row * self.seq_len : (row + 1) * self.seq_len]
        return stream_row(tokens, self.seq_len, self.eos_id, self.packing)

    def window(self, s: int, epoch: int, w: int) -> np.ndarray:
        """The tokens of source `s`'s shuffle window (read once, kept until the next window)."""
        cached = self._windows[s]
        if cached is None or cached[0] != (epoch, w):
            pieces = [self.sets[s].read(shard, a, b) for shard, a, b in self.orders[s].window_ranges(epoch, w)]
            self._windows[s] = cached = ((epoch, w), np.concatenate(pieces))
        return cached[1]

    @property
    def buffered_tokens(self) -> int:
        return sum(len(c[1]) for c in self._windows if c is not None)


class ValRows(Dataset):
    """The validation tail of every source, row by row, in prepared order."""

    def __init__(self, sets: list[ShardSet], segments: list[list[Segment]], seq_len: int, eos_id: int,
                 packing: str) -> None:
        self.sets, self.segments, self.seq_len, self.eos_id, self.packing = sets, segments, seq_len, eos_id, packing
        self.starts = [np.concatenate([[0], np.cumsum([s.end - s.start for s in segs])[:-1]]).astype(np.int64)
                       if segs else np.zeros(0, np.int64) for segs in segments]
        rows = [sum(s.end - s.start for s in segs) // seq_len for segs in segments]
        self.first = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.first[-1])

    def __getitem__(self, i: int):
        s = int(np.searchsorted(self.first, i, side="right")) - 1
        lo = (i - int(self.first[s])) * self.seq_len
        ranges = token_ranges(self.segments[s], self.starts[s], lo, lo + self.seq_len)
        tokens = np.concatenate([self.sets[s].read(shard, a, b) for shard, a, b in ranges])
        return stream_row(tokens, self.seq_len, self.eos_id, self.packing)


class RangeSampler(ResumableSampler):
    """This rank's indices rank, rank + world, ... as a lazy range: `DistributedSampler` lists every index,
    which for a stream of billions of rows is memory that grows with the corpus. No shuffle (the dataset
    orders itself), no padding (the length is a multiple of the world size, or the tail is dropped)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed, drop_last=True)

    def first_index(self) -> int:
        return 0

    def __iter__(self):
        start, self.start = self.start, 0
        base = self.first_index()
        end = base + self.num_samples * self.num_replicas
        return iter(range(base + self.rank + start * self.num_replicas, end, self.num_replicas))


class StreamSampler(RangeSampler):
    """Stream positions in order, one rank's share: epoch e yields e x len(dataset) + rank, + world, ...

    `order` holds what decides the stream beyond the step loader's own fields; `strict_order`: a
    resume that changes any of it is refused even at an epoch boundary (positions carry over epochs).
    """

    strict_order = True

    def __init__(self, dataset: StreamRows, num_replicas: int, rank: int, seed: int, order: dict[str, Any]) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
        self.order = order

    def first_index(self) -> int:
        return self.epoch * len(self.dataset)


class StreamingPretrainData(StageData):
    """Pretraining rows streamed from `llmstages data prepare` shards, mixed, shuffled, exactly resumable."""

    def __init__(
        self,
        sources: str | dict[str, str],
        weights: dict[str, float] | None = None,
        packing: Literal["documents", "concat"] = "documents",
        shuffle_buffer: int = 1024,
        storage_options: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        """
        Args:
            sources: a prepared shard folder or URL (`s3://bucket/prefix`), or several by name ({web: ..., code: ...}).
            weights: each named source's share of the rows ({web: 0.7, code: 0.3}); exact over every window of
                N rows, N the shares' common denominator (10 here); null: equal shares.
            packing: documents (attention and positions isolated per document) or concat (attention crosses documents).
            shuffle_buffer: rows per shuffle window (per source and rank: its memory is this x seq_len tokens).
            storage_options: fsspec options for the URL (e.g. {endpoint_url: http://127.0.0.1:9000} for an
                S3-compatible server; AWS_ENDPOINT_URL and the usual AWS variables are read too).
        """
        super().__init__(**kwargs)
        self.sources = {"data": str(sources)} if isinstance(sources, str) else {str(k): str(v) for k, v in sources.items()}
        if not self.sources:
            raise ShardError("sources: give a prepared shard folder or URL, or a mapping of names to them")
        try:
            self.mixture = Mixture(list(self.sources), weights)
        except ValueError as err:
            raise ShardError(f"weights: {err}") from None
        self.packing = check_packing(packing, ("documents", "concat"))
        if shuffle_buffer < 1:
            raise ShardError(f"shuffle_buffer must be >= 1 row, got {shuffle_buffer}")
        self.shuffle_buffer, self.storage_options = shuffle_buffer, storage_options

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _build(self) -> None:
        world, rank = self._world()
        sets = [ShardSet(location, self.storage_options) for location in self.sources.values()]
        mine = tokenizer_fingerprint(self.tokenizer)
        orders, val_segments = [], []
        for s, (name, shard_set) in enumerate(zip(self.sources, sets)):
            if shard_set.index["tokenizer"] != mine:
                raise ShardError(f"{shard_set.location}: its shards were prepared with tokenizer {shard_set.index['tokenizer']}, "
                                 f"this run's tokenizer is {mine}: pass the tokenizer they were prepared with")
            train, val = split_segments(shard_set.shard_tokens, self.seq_len, self.val_fraction)
            order = SourceOrder(train, self.seq_len, world, rank, self.seed, s, self.shuffle, self.shuffle_buffer)
            if order.per_rank < 1:
                raise ShardError(f"{shard_set.location}: {order.rows} training rows of seq_len={self.seq_len}, "
                                 f"fewer than the {world} ranks")
            orders.append(order)
            val_segments.append(val)
        epoch_rows = self.mixture.epoch_rows([o.per_rank for o in orders])
        if epoch_rows < 1:
            raise ShardError(f"sources {self.sources}: too few rows per rank ({[o.per_rank for o in orders]}) for one "
                             f"pattern of {self.mixture.size} rows ({dict(zip(self.sources, self.mixture.counts))})")
        eos = self.tokenizer.eos_id
        self.train_set = StreamRows(sets, orders, self.mixture, epoch_rows, eos, self.packing)
        self.val_set = ValRows(sets, val_segments, self.seq_len, eos, self.packing)
        sizes = ", ".join(f"{n}: {s.index['tokens']:,} tokens, {o.rows} rows" for n, s, o in zip(self.sources, sets, orders))
        rank_zero_info(f"streamed pretrain data ({sizes}); {epoch_rows} rows per rank per epoch, {len(self.val_set)} "
                       f"validation rows of {self.seq_len} ({self.packing}, pattern "
                       f"{dict(zip(self.sources, self.mixture.counts))} per {self.mixture.size} rows)")

    def stream_order(self) -> dict[str, Any]:
        """What decides the stream besides ranks, batch size and accumulation (saved with the loader's state)."""
        sets = self.train_set.sets if isinstance(self.train_set, StreamRows) else []
        return {
            "seq_len": self.seq_len, "stream_seed": self.seed, "stream_shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer, "val_fraction": self.val_fraction,
            "sources": {name: s.key for name, s in zip(self.sources, sets)},
            "weights": {name: f"{c}/{self.mixture.size}" for name, c in zip(self.sources, self.mixture.counts)},
        }

    def _sampler(self, dataset: Dataset, shuffle: bool) -> ResumableSampler:
        world, rank = self._world()
        if not isinstance(dataset, StreamRows):  # validation rows
            return RangeSampler(dataset, num_replicas=world, rank=rank, seed=self.seed)
        return StreamSampler(dataset, num_replicas=world, rank=rank, seed=self.seed, order=self.stream_order())

    def collate(self, items: list) -> LMBatch:
        return stack_rows(items)
