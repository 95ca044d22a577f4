"""Micro-batches annotated with the counts of their whole optimiser step.

`normalize: token` divides the step's summed token loss by the number of
target tokens in the *whole step*: every accumulated micro-batch on every
rank. That number must be known before the step's first backward, so this
wrapper reads the step's micro-batches ahead, counts their targets and
sequences, and attaches the local totals to each micro-batch as
`num_step_tokens` / `num_step_sequences`; the stage sums them across ranks.
Only counting happens here; the loss itself lives in `llmstages.losses`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch

Counter = Callable[[dict], tuple[int, int]]


class StepLookaheadLoader:
    def __init__(self, loader: Iterable[dict], accumulate: int, count: Counter, limit: int | None = None) -> None:
        """`limit`: the epoch ends after this many micro-batches (the trainer's
        `limit_train_batches`), so the last step's counts cover only the batches it runs."""
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.loader, self.accumulate, self.count, self.limit = loader, accumulate, count, limit

    def __len__(self) -> int:
        n = len(self.loader)  # type: ignore[arg-type]
        return n if self.limit is None else min(n, self.limit)

    def __iter__(self) -> Iterator[dict]:
        buffer: list[dict] = []
        for batch in itertools.islice(self.loader, self.limit):
            buffer.append(batch)
            if len(buffer) == self.accumulate:
                yield from self._annotate(buffer)
                buffer = []
        if buffer:  # the epoch's last, shorter step
            yield from self._annotate(buffer)

    def _annotate(self, batches: list[dict]) -> Iterator[dict]:
        tokens = sequences = 0
        for batch in batches:
            t, s = self.count(batch)
            tokens, sequences = tokens + t, sequences + s
        for batch in batches:
            batch["num_step_tokens"] = torch.tensor(tokens)
            batch["num_step_sequences"] = torch.tensor(sequences)
            yield batch
