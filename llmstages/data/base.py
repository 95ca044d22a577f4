"""StageData: what the three data modules share (tokenizer, split, loaders, summaries).

Design choices:
- Tokens in, batches out (the batch contract, `llmstages.data.batch`); no loss here.
- One encode path for training and validation (LLaMA-Factory #5165): the
  split happens on encoded examples, never before a second encode.
- `tokenizer: null` means the embedded default tokenizer, trained once on the
  embedded data and cached, so the demo's stages share one vocabulary. Your
  own data wants your own tokenizer (`llmstages tokenizer train`), passed as
  a path to `tokenizer.json` or its folder.
- Bad records follow `on_error` (see `formats`); over-long examples follow
  `truncation` (see `packing.truncate`); every skip is counted and reported
  once; nothing usable left is an error.
- Training batches come through `StepLookaheadLoader`, which attaches the
  optimiser step's target-token and sequence counts for exact loss
  normalisation. Shards are disjoint per rank (`DistributedSampler` with the
  trainer's world size and rank, reshuffled per epoch from `seed`).
- The training loader is resumable mid-epoch (Lightning's stateful-dataloader
  protocol, see `loader`): the sampler can start anywhere in an epoch's order,
  and `on_before_batch_transfer` tells the loader which batches training took.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from llmstages.data import synthetic
from llmstages.data.data_loss import describe_loss
from llmstages.data.formats import LoadReport
from llmstages.data.loader import ResumableSampler, StepLookaheadLoader
from llmstages.data.tokenizer import Tokenizer
from llmstages.errors import UserError
from llmstages.losses import count_sequences, count_targets

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 1024


def default_tokenizer(cache_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """The embedded data's byte-level BPE, trained once per cache folder."""
    path = Path(cache_dir) / f"default-tokenizer-{vocab_size}"
    if (path / "tokenizer.json").exists():
        return Tokenizer.from_file(path)
    texts = synthetic.pretrain_corpus()
    texts += [m["content"] for c in synthetic.sft_conversations() for m in c["messages"]]
    tokenizer = Tokenizer.train(texts, vocab_size=vocab_size, show_progress=False)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tokenizer.save(tmp)
    if path.exists():  # another process won the race; both trained the same tokenizer
        shutil.rmtree(tmp)
    else:
        tmp.replace(path)
    return Tokenizer.from_file(path)


def load_tokenizer(spec: str | None, cache_dir: str | Path) -> Tokenizer:
    return default_tokenizer(cache_dir) if spec is None else Tokenizer.from_file(spec)


class ListDataset(Dataset):
    """A map-style dataset over an in-memory list of encoded examples."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class StageData(L.LightningDataModule):
    """What the data modules share: tokenizer, split, loaders, summaries."""

    def __init__(
        self,
        tokenizer: str | None = None,
        batch_size: int = 8,
        seq_len: int = 256,
        shuffle: bool = True,
        seed: int = 0,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        cache_dir: str = ".cache/llmstages",
    ) -> None:
        """
        Args:
            tokenizer: a `tokenizer.json` or its folder; null: the embedded data's default tokenizer.
            batch_size: examples (or packed rows) per micro-batch, per rank.
            seq_len: tokens per row; longer examples follow `truncation`.
            shuffle: reshuffle the training rows every epoch (seeded by `seed`).
            seed: the validation split, the shuffle order and the embedded data's generator.
            val_fraction: share of examples held out for validation.
            num_workers: DataLoader worker processes.
            cache_dir: where the default tokenizer and token caches live.
        """
        super().__init__()
        # checkpoints carry the data's settings (datamodule_hyper_parameters): export, generate and chat
        # find the run's tokenizer and template there
        self.save_hyperparameters()
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"batch_size must be >= 1 and seq_len >= 2, got {batch_size} and {seq_len}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.batch_size, self.seq_len, self.shuffle, self.seed = batch_size, seq_len, shuffle, seed
        self.val_fraction, self.num_workers, self.cache_dir = val_fraction, num_workers, Path(cache_dir)
        self.tokenizer = load_tokenizer(tokenizer, self.cache_dir)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.skipped: Counter[str] = Counter()
        self.truncated = 0  # examples kept but cut (counted by the subclasses' encode)
        self.data_loss: str | None = None  # the loud-data-loss warning, when more than 10% was lost or cut
        self._train_loader: StepLookaheadLoader | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # subclasses build self.train_set / self.val_set
    def _build(self) -> None:
        raise NotImplementedError

    #: the training loader's class: what it attaches to each micro-batch beyond the step's counts
    step_loader: type[StepLookaheadLoader] = StepLookaheadLoader

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _count(self, batch: dict) -> tuple[int, int]:
        """(target tokens, sequences) in a micro-batch, for step-level normalisation."""
        return count_targets(batch["labels"]), count_sequences(batch["labels"], batch.get("document_ids"))

    def read_records(self, read: Callable[[Path], tuple[list, LoadReport]], embedded: Callable[[], list],
                     kind: str) -> tuple[list, list[LoadReport]]:
        """The records of `self.files` through `read(file)` in file order, with each file's report, or
        `embedded()` when no files are given. `self._origins` names each record (file and record, or
        "embedded <kind> k"), for the errors a chat template raises after reading (`templated`)."""
        if not self.files:
            records = embedded()
            self._origins = [f"embedded {kind} {k}" for k in range(len(records))]
            return records, []
        records, reports, self._origins = [], [], []
        for file in self.files:
            items, report = read(file)
            records += items
            # kept records in file order (their index in the file when nothing was skipped)
            self._origins += [f"{file}: record {k}" + (" of those kept" if report.skipped else "") for k in range(len(items))]
            reports.append(report)
        return records, reports

    def templated(self, origin: str | None, encode: Callable[[], T]) -> T | None:
        """`encode()`, one record through the chat template, whose refusal is that record's error:
        under `on_error: raise` a `UserError` prefixed by `origin` (file and record; the bare error when
        None), under `skip` counted as `no_targets` or `template_error`, and None."""
        try:
            return encode()
        except ValueError as error:
            if getattr(self, "on_error", "raise") == "raise":
                if origin is None:
                    raise
                raise UserError(f"{origin}: {error}") from None
            self.skipped["no_targets" if "no target tokens" in str(error) else "template_error"] += 1
            return None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._build()

    def _split(self, items: list) -> tuple[list, list]:
        """Deterministic split: a seeded permutation, the first `val_fraction` to validation."""
        order = np.random.default_rng(self.seed).permutation(len(items))
        n_val = int(round(len(items) * self.val_fraction))
        if self.val_fraction > 0 and len(items) > 1:
            n_val = max(1, n_val)
        val = [items[i] for i in sorted(order[:n_val])]
        train = [items[i] for i in sorted(order[n_val:])]
        if not train:
            raise ValueError("no training examples left after the validation split")
        return train, val

    def _sampler(self, dataset: Dataset, shuffle: bool) -> ResumableSampler:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._sampler(dataset, shuffle),
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> StepLookaheadLoader:
        self.setup("fit")
        loader = self._loader(self.train_set, self.shuffle)
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        wrapped = self.step_loader(
            loader, accumulate, self._count, batch_limit(trainer, len(loader)),
            sampler=loader.sampler, batch_size=self.batch_size,  # Lightning calls sampler.set_epoch through it
        )
        self._train_loader = wrapped
        return wrapped

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # exactly once per batch training takes (Lightning's prefetched batch is not counted yet)
        trainer = self.trainer
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.mark_consumed()
        return batch

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        if not self.val_set:
            return []  # type: ignore[return-value]
        return self._loader(self.val_set, shuffle=False)

    #: the `data_loss.HINTS` key for an example kept but cut
    _truncation_reason = "truncated"

    def _report(self, name: str, kept: int, reports: list[LoadReport] = ()) -> None:
        """Log what was kept, skipped and cut; warn (once, rank 0) when more than 10% was lost (`data_loss`)."""
        for report in reports:
            self.skipped.update(report.skipped)
            if report.ignored:  # fields no reader uses (on_error: skip, or known-ignorable): named once
                fields = ", ".join(f"{k} ({v})" for k, v in sorted(report.ignored.items(), key=lambda kv: (-kv[1], kv[0])))
                rank_zero_warn(f"{report.path.name}: fields not used for training, ignored: {fields}")
        parts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        cut = getattr(self, "truncated", 0)
        rank_zero_info(
            f"{name}: kept {kept} examples" + (f", skipped {sum(self.skipped.values())} ({parts})" if parts else "")
            + (f", {cut} of them truncated" if cut else "")
        )
        lost = {**self.skipped, self._truncation_reason: cut}
        settings = {key: getattr(self, key, None) for key in ("seq_len", "truncation", "max_prompt_len")}
        self.data_loss = describe_loss(name, kept + sum(self.skipped.values()), lost, settings)
        if self.data_loss is not None:
            rank_zero_warn(self.data_loss)
        if kept == 0:
            raise ValueError(f"{name}: no usable examples left ({parts or 'empty input'})")


def batch_limit(trainer, available: int) -> int | None:
    """The micro-batches Lightning will take from an epoch (`limit_train_batches`), None for all."""
    limit = getattr(trainer, "limit_train_batches", None) if trainer is not None else None
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        return None
    if isinstance(limit, float):
        return int(available * limit)
    return min(int(limit), available)
