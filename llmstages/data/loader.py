"""Micro-batches annotated with the counts of their whole optimiser step, resumable mid-epoch.

`normalize: token` divides the step's summed token loss by the number of
target tokens in the *whole step*: every accumulated micro-batch on every
rank. That number must be known before the step's first backward, so this
wrapper reads the step's micro-batches ahead, counts their targets and
sequences, and attaches the local totals to each micro-batch as
`num_step_tokens` / `num_step_sequences`; the stage sums them across ranks.
Only counting happens here; the loss itself lives in `llmstages.losses`.

Exact resume (Lightning's stateful-dataloader protocol: Lightning saves
`state_dict()` in every checkpoint and calls `load_state_dict()` before the
resumed epoch's `iter`):
- The state is the epoch, the micro-batches *consumed* by training in it, and
  what decides the order (sampler seed, shuffle, ranks, batch size,
  accumulation). Lightning prefetches a batch ahead, so "yielded" is not
  "trained": the data module reports each batch training actually takes
  (`mark_consumed`, from its `on_before_batch_transfer` hook).
- Resuming starts the sampler at the first index of the interrupted step
  (`ResumableSampler.start`: index arithmetic, no data is read or skipped
  through), re-reads only that step's micro-batches for its counts, and yields
  from the first one not yet trained. So a run killed anywhere continues with
  exactly the batches, and step counts, of an uninterrupted run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils.data import DistributedSampler

from llmstages.errors import UserError

Counter = Callable[[dict], tuple[int, int]]


class ResumeMismatch(UserError, ValueError):
    """A resume whose data order differs from the checkpoint's (a user error: `llmstages.errors` knows it)."""


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` whose next epoch can begin at position `start` of this rank's order."""

    start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


class StepLookaheadLoader:
    def __init__(
        self, loader: Iterable[dict], accumulate: int, count: Counter, limit: int | None = None,
        sampler: ResumableSampler | None = None, batch_size: int | None = None,
    ) -> None:
        """`limit`: the epoch ends after this many micro-batches (the trainer's
        `limit_train_batches`), so the last step's counts cover only the batches it runs.
        `sampler`/`batch_size`: the loader's `ResumableSampler` and micro-batch size, needed
        to resume mid-epoch (a plain iterable can only resume at an epoch boundary)."""
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.loader, self.accumulate, self.count, self.limit = loader, accumulate, count, limit
        self.sampler, self.batch_size = sampler, batch_size
        self._epoch, self._consumed = self._sampler_epoch(), 0
        self._resume: dict | None = None

    def __len__(self) -> int:
        n = len(self.loader)  # type: ignore[arg-type]
        return n if self.limit is None else min(n, self.limit)

    # ----------------------------------------------------------------- Lightning's stateful protocol

    def _sampler_epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def _order(self) -> dict:
        s = self.sampler
        return {
            "seed": getattr(s, "seed", None), "shuffle": getattr(s, "shuffle", None),
            "num_replicas": getattr(s, "num_replicas", None), "batch_size": self.batch_size,
            "accumulate": self.accumulate, "limit": self.limit,
            **getattr(s, "order", {}),  # a streamed source's own (sources, weights, seq_len, ...)
        }

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "consumed": self._consumed, **self._order()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._order()
        changed = {k: (state.get(k), v) for k, v in mine.items() if k in state and state[k] != v}
        # a stream's positions run on across epochs: any change moves every later row, not only this epoch's
        strict = getattr(self.sampler, "strict_order", False)
        if changed and (state.get("consumed", 0) or strict):
            details = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
            raise ResumeMismatch(
                f"cannot resume the training data {'stream' if strict else 'mid-epoch'}: what decides its order "
                f"changed since the checkpoint ({details}); resume with the checkpoint's settings"
            )
        self._resume = dict(state)

    def mark_consumed(self) -> None:
        """Training took the next micro-batch (called by the data module for each training batch)."""
        self._consumed += 1

    # ----------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[dict]:
        start = self._begin_epoch()
        step_start = start - start % self.accumulate  # the interrupted step is re-read for its counts
        if step_start:
            self.sampler.start = step_start * self.batch_size
        return self._batches(step_start, start - step_start)

    def _begin_epoch(self) -> int:
        """The micro-batches of this epoch already trained (non-zero only when resuming into it)."""
        epoch, start = self._sampler_epoch(), 0
        resume, self._resume = self._resume, None
        if resume is not None and int(resume.get("epoch", -1)) == epoch:
            start = int(resume.get("consumed", 0))
        if start and self.sampler is None:
            raise ValueError("this training loader has no ResumableSampler: it can only resume at an epoch boundary")
        self._epoch, self._consumed = epoch, start
        return start

    def _batches(self, first: int, skip: int) -> Iterator[dict]:
        buffer: list[dict] = []
        stop = None if self.limit is None else max(0, self.limit - first)
        for batch in itertools.islice(self.loader, stop):
            buffer.append(batch)
            if len(buffer) == self.accumulate:
                yield from itertools.islice(self._annotate(buffer), skip, None)
                buffer, skip = [], 0
        if buffer:  # the epoch's last, shorter step
            yield from itertools.islice(self._annotate(buffer), skip, None)

    def _annotate(self, batches: list[dict]) -> Iterator[dict]:
        tokens = sequences = 0
        for batch in batches:
            t, s = self.count(batch)
            tokens, sequences = tokens + t, sequences + s
        for batch in batches:
            batch["num_step_tokens"] = torch.tensor(tokens)
            batch["num_step_sequences"] = torch.tensor(sequences)
            yield batch
