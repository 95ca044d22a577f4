"""Which row a rank trains on at stream position k: pure functions of the seed, epoch, rank and position.

Design choices:
- One source's training tokens are segments (a shard, or the part of it before the validation
  tail). Each source epoch permutes the segments (seeded by seed, epoch, source) and cuts the
  concatenation into rows of `seq_len`: a row may span two shards, so the packing remainder
  of one shard starts the next row, and only the last `< seq_len` tokens of an epoch are unused.
- Each rank owns a contiguous, disjoint range of `rows // world` rows of that epoch (read as
  long ranges: few requests to object storage).
- The shuffle buffer is a window of `window` consecutive rows of the rank's range, emitted in a
  seeded permutation: bounded memory (one window per source), and the window and its order
  are a function of the position, so resuming needs no buffer contents.
- Mixing: weights are exact fractions c_s / N (N <= 1000); the stream repeats a fixed pattern
  of N slots with c_s slots of source s, spread evenly (smooth weighted round robin). Every
  aligned window of N rows of a rank's stream holds exactly c_s rows of source s. Each source
  cycles through its own epochs independently (a small source repeats sooner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

MAX_PATTERN = 1000


@dataclass(frozen=True)
class Segment:
    shard: int
    start: int  # token offsets inside the shard
    end: int


def split_segments(shard_tokens: list[int], seq_len: int, val_fraction: float) -> tuple[list[Segment], list[Segment]]:
    """(training segments, validation segments): validation is the last `val_fraction` of the rows, in
    prepared order (at least one row when `val_fraction` > 0)."""
    total = sum(shard_tokens)
    rows = total // seq_len
    n_val = int(round(rows * val_fraction))
    if val_fraction > 0 and rows > 1:
        n_val = max(1, n_val)
    cut = total - n_val * seq_len
    train, val, offset = [], [], 0
    for shard, n in enumerate(shard_tokens):
        lo, hi = offset, offset + n
        if lo < cut:
            train.append(Segment(shard, 0, min(hi, cut) - lo))
        if hi > cut:
            val.append(Segment(shard, max(lo, cut) - lo, n))
        offset = hi
    return train, val


def token_ranges(segments: list[Segment], starts: np.ndarray, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(shard, start, end) pieces of tokens [lo, hi) of the concatenated `segments` (`starts`: their cumulative offsets)."""
    out = []
    i = int(np.searchsorted(starts, lo, side="right")) - 1
    while lo < hi:
        seg = segments[i]
        seg_lo = int(starts[i])
        take_hi = min(hi, seg_lo + seg.end - seg.start)
        out.append((seg.shard, seg.start + lo - seg_lo, seg.start + take_hi - seg_lo))
        lo, i = take_hi, i + 1
    return out


class SourceOrder:
    """One source's rows for one rank: per source epoch a shard order, the rank's range, shuffle windows."""

    def __init__(self, segments: list[Segment], seq_len: int, world: int, rank: int, seed: int, source: int,
                 shuffle: bool, window: int) -> None:
        self.segments, self.seq_len, self.world, self.rank = segments, seq_len, world, rank
        self.seed, self.source, self.shuffle, self.window = seed, source, shuffle, window
        self.rows = sum(s.end - s.start for s in segments) // seq_len
        self.per_rank = self.rows // world
        self._epoch: tuple[int, list[Segment], np.ndarray] | None = None

    def epoch_segments(self, epoch: int) -> tuple[list[Segment], np.ndarray]:
        """The epoch's segment order and cumulative token offsets (cached: one epoch at a time)."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = list(self.segments)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch, self.source, 1]).permutation(len(order))
                order = [order[i] for i in perm]
            starts = np.concatenate([[0], np.cumsum([s.end - s.start for s in order])[:-1]]).astype(np.int64)
            self._epoch = (epoch, order, starts)
        return self._epoch[1], self._epoch[2]

    def locate(self, j: int) -> tuple[int, int, int]:
        """(source epoch, window, row inside the window's token span) of the source's j-th row on this rank."""
        epoch, p = divmod(j, self.per_rank)
        w, i = divmod(p, self.window)
        return epoch, w, int(self.window_order(epoch, w)[i])

    def window_size(self, w: int) -> int:
        return min(self.window, self.per_rank - w * self.window)

    def window_order(self, epoch: int, w: int) -> np.ndarray:
        n = self.window_size(w)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, self.source, 2, w]).permutation(n)

    def window_ranges(self, epoch: int, w: int) -> list[tuple[int, int, int]]:
        """(shard, start, end) token pieces of window `w`: `window_size(w)` consecutive rows of this rank's range."""
        segments, starts = self.epoch_segments(epoch)
        first_row = self.rank * self.per_rank + w * self.window
        lo = first_row * self.seq_len
        return token_ranges(segments, starts, lo, lo + self.window_size(w) * self.seq_len)


class Mixture:
    """The fixed pattern of N slots by which sources interleave (see the module docstring)."""

    def __init__(self, names: list[str], weights: dict[str, float] | None) -> None:
        weights = weights or {n: 1.0 for n in names}
        unknown, missing = sorted(set(weights) - set(names)), sorted(set(names) - set(weights))
        if unknown or missing:
            raise ValueError(f"weights must name every source once: sources {names}, weights {sorted(weights)}"
                             + (f" (unknown: {unknown})" if unknown else "") + (f" (missing: {missing})" if missing else ""))
        if any(not w > 0 for w in weights.values()):
            raise ValueError(f"weights must be > 0, got {weights}")
        total = sum(Fraction(str(weights[n])) for n in names)
        fractions = [Fraction(str(weights[n])) / total for n in names]
        n_slots = math.lcm(*(f.denominator for f in fractions))
        if n_slots > MAX_PATTERN:
            raise ValueError(f"weights {weights} need a pattern of {n_slots} rows to be exact; use weights whose "
                             f"shares have a common denominator of at most {MAX_PATTERN} (e.g. 0.7 and 0.3)")
        self.names, self.size = names, n_slots
        self.counts = [int(f * n_slots) for f in fractions]
        taken = [0] * len(names)
        self.pattern: list[int] = []
        for t in range(n_slots):  # smooth: each source as close as possible to its share of every prefix
            s = max(range(len(names)), key=lambda i: (Fraction((t + 1) * self.counts[i], n_slots) - taken[i], -i))
            self.pattern.append(s)
            taken[s] += 1
        self.occurrence = [self.pattern[:t].count(s) for t, s in enumerate(self.pattern)]

    def locate(self, k: int) -> tuple[int, int]:
        """(source, that source's row number j) of the stream's k-th row."""
        cycle, slot = divmod(k, self.size)
        s = self.pattern[slot]
        return s, cycle * self.counts[s] + self.occurrence[slot]

    def epoch_rows(self, per_rank: list[int]) -> int:
        """Rows per rank in one trainer epoch: full patterns until the first source would repeat."""
        return self.size * min(n // c for n, c in zip(per_rank, self.counts))
