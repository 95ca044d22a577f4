"""The three LightningDataModules: PretrainData, SFTData, PreferenceData.

Design choices:
- Tokens in, batches out (the batch contract of DESIGN.md); no loss here.
- One encode path for training and validation (LLaMA-Factory #5165): the
  split happens on encoded examples, never before a second encode.
- `tokenizer: null` means the embedded default tokenizer, trained once on the
  embedded data and cached, so the four stages of the demo share one
  vocabulary. Your own data wants your own tokenizer (`llmstages tokenizer
  train`), passed as a path to `tokenizer.json` or its folder.
- Bad records follow `on_error` (see `formats`); over-long examples follow
  `truncation` (see `packing.truncate`); every skip is counted and reported
  once; nothing usable left is an error.
- Training batches come through `StepLookaheadLoader`, which attaches the
  optimiser step's target-token and sequence counts for exact loss
  normalisation. Shards are disjoint per rank (`DistributedSampler` with the
  trainer's world size and rank, reshuffled per epoch from `seed`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from rich.progress import Progress, track
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from llmstages.data import synthetic
from llmstages.data.formats import ON_ERROR, LoadReport, iter_text, read_chat, read_preference
from llmstages.data.loader import StepLookaheadLoader
from llmstages.data.packing import (
    IGNORE_INDEX,
    best_fit_decreasing,
    check_packing,
    fill_ratio,
    pack_examples,
    pad_examples,
    stack_rows,
    stream_row,
    TRUNCATION_POLICIES,
    truncate,
)
from llmstages.data.templates import LOSS_MASKS, ChatTemplate
from llmstages.data.tokenizer import Tokenizer
from llmstages.losses import check_choice, count_sequences, count_targets

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


class _ListDataset(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


class StageData(L.LightningDataModule):
    """What the three data modules share: tokenizer, split, loaders, summaries."""

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
        super().__init__()
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

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # subclasses build self.train_set / self.val_set
    def _build(self) -> None:
        raise NotImplementedError

    def _collate(self, items: list) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _count(self, batch: dict) -> tuple[int, int]:
        """(target tokens, sequences) in a micro-batch, for step-level normalisation."""
        return count_targets(batch["labels"]), count_sequences(batch["labels"], batch.get("document_ids"))

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

    def _sampler(self, dataset: Dataset, shuffle: bool) -> DistributedSampler:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._sampler(dataset, shuffle),
            collate_fn=self._collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> StepLookaheadLoader:
        self.setup("fit")
        loader = self._loader(self.train_set, self.shuffle)
        trainer = self.trainer
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        wrapped = StepLookaheadLoader(loader, accumulate, self._count, _batch_limit(trainer, len(loader)))
        wrapped.sampler = loader.sampler  # Lightning calls sampler.set_epoch through this attribute
        return wrapped

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        if not self.val_set:
            return []  # type: ignore[return-value]
        return self._loader(self.val_set, shuffle=False)

    def _report(self, name: str, kept: int, reports: list[LoadReport] = ()) -> None:
        for report in reports:
            self.skipped.update(report.skipped)
        parts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        rank_zero_info(f"{name}: kept {kept} examples" + (f", skipped {sum(self.skipped.values())} ({parts})" if parts else ""))
        if kept == 0:
            raise ValueError(f"{name}: no usable examples left ({parts or 'empty input'})")


def _batch_limit(trainer, available: int) -> int | None:
    """The micro-batches Lightning will take from an epoch (`limit_train_batches`), None for all."""
    limit = getattr(trainer, "limit_train_batches", None) if trainer is not None else None
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        return None
    if isinstance(limit, float):
        return int(available * limit)
    return min(int(limit), available)


def _file_digest(paths: list[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for path in paths:
        h.update(str(path.resolve()).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _TokenRows(Dataset):
    def __init__(self, tokens: np.ndarray, rows: np.ndarray, seq_len: int, eos_id: int, packing: str) -> None:
        self.tokens, self.rows, self.seq_len, self.eos_id, self.packing = tokens, rows, seq_len, eos_id, packing

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = int(self.rows[i]) * self.seq_len
        return stream_row(self.tokens[start : start + self.seq_len], self.seq_len, self.eos_id, self.packing)


class PretrainData(StageData):
    """Text -> tokens (EOS after every document) -> rows of `seq_len`.

    Tokens are cached on disk as a memory-mapped array keyed by the inputs'
    content and the tokenizer. Files are streamed line by line (`.txt`,
    `.jsonl`) and encoded in chunks, so a corpus larger than memory is encoded
    once and trained on from the memory map.
    """

    encode_chunk = 1024  # documents per `encode_batch` call

    def __init__(
        self,
        files: list[str] | None = None,
        text_mode: str = "line",
        packing: str = "documents",
        on_error: str = "raise",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.files = [Path(f) for f in files] if files else None
        self.text_mode = check_choice("text_mode", text_mode, ("line", "file"))
        self.on_error = check_choice("on_error", on_error, ON_ERROR)
        self.packing = check_packing(packing, ("documents", "concat"))

    def token_cache(self) -> Path:
        """Encode the corpus once; later runs with the same inputs and tokenizer reuse the file."""
        tok_json = self.tokenizer.to_json()
        if self.files:
            key = _file_digest(self.files, f"{self.text_mode}|{tok_json}")
        else:
            # keyed on the generated text itself: a new seed or generator version is a new cache
            docs = synthetic.pretrain_corpus(seed=self.seed)
            key = hashlib.sha256("\n".join(["embedded", tok_json, *docs]).encode()).hexdigest()[:16]
        path = self.cache_dir / f"tokens-{key}.bin"
        if path.exists():
            return path
        dtype = np.uint16 if self.tokenizer.vocab_size < 2**16 else np.uint32
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        eos, n_docs = self.tokenizer.eos_id, 0
        sources = [iter_text(f, mode=self.text_mode, on_error=self.on_error) for f in self.files] if self.files else [docs]
        total = sum(f.stat().st_size for f in self.files) if self.files else sum(len(d) for d in docs)
        with open(tmp, "wb") as out, Progress(disable=total < 10_000_000) as progress:
            task = progress.add_task("tokenising", total=total)
            for source in sources:
                for chunk in _chunks(source, self.encode_chunk):
                    for ids in self.tokenizer.encode_batch(chunk):
                        np.asarray(ids + [eos], dtype=dtype).tofile(out)
                    n_docs += len(chunk)
                    progress.advance(task, sum(len(d) for d in chunk))
        if self.files:
            self._report("pretrain data", n_docs, [s.report for s in sources])
        meta = tmp.with_name(tmp.name + ".json")
        meta.write_text(json.dumps({"dtype": np.dtype(dtype).name, "documents": n_docs}))
        meta.replace(path.with_suffix(".json"))  # before the tokens: a visible cache always has its metadata
        tmp.replace(path)  # atomic: a killed run never leaves a half-written cache behind
        return path

    def _build(self) -> None:
        path = self.token_cache()
        dtype = json.loads(path.with_suffix(".json").read_text())["dtype"]
        tokens = np.memmap(path, dtype=dtype, mode="r")
        n_rows = len(tokens) // self.seq_len
        if n_rows < 2:
            raise ValueError(f"the corpus has {len(tokens)} tokens: not even two rows of seq_len={self.seq_len}")
        train_rows, val_rows = self._split(list(range(n_rows)))
        eos = self.tokenizer.eos_id
        self.train_set = _TokenRows(tokens, np.asarray(train_rows), self.seq_len, eos, self.packing)
        self.val_set = _TokenRows(tokens, np.asarray(val_rows), self.seq_len, eos, self.packing)
        rank_zero_info(
            f"pretrain data: {len(tokens):,} tokens, {len(train_rows)} training and {len(val_rows)} validation rows "
            f"of {self.seq_len} ({self.packing})"
        )

    def _collate(self, items: list) -> dict[str, torch.Tensor]:
        return stack_rows(items)


class SFTData(StageData):
    """Conversations -> chat template -> masked examples -> padded or packed rows."""

    def __init__(
        self,
        files: list[str] | None = None,
        format: str = "auto",
        template: str = "chatml",
        loss_mask: str = "assistant",
        packing: str = "documents",
        truncation: str = "right",
        on_error: str = "raise",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.files = [Path(f) for f in files] if files else None
        self.format = format
        self.loss_mask = check_choice("loss_mask", loss_mask, LOSS_MASKS)
        self.truncation = check_choice("truncation", truncation, TRUNCATION_POLICIES)
        self.on_error = check_choice("on_error", on_error, ON_ERROR)
        self.template = ChatTemplate.get(template)
        self.packing = check_packing(packing, ("none", "documents"))
        self.val_conversations: list[list[dict]] = []
        self.truncated = 0

    def _conversations(self) -> tuple[list[list[dict]], list[LoadReport]]:
        if not self.files:
            return [c["messages"] for c in synthetic.sft_conversations(seed=self.seed)], []
        conversations, reports = [], []
        for file in self.files:
            records, report = read_chat(file, format=self.format, on_error=self.on_error)
            conversations += records
            reports.append(report)
        return conversations, reports

    def encode(self, messages: list[dict]) -> dict | None:
        """One conversation -> a truncated example, or None (with the reason counted)."""
        try:
            example = self.template.encode(messages, self.tokenizer, loss_mask=self.loss_mask)
        except ValueError as error:
            if self.on_error == "raise":
                raise
            self.skipped["no_targets" if "no target tokens" in str(error) else "template_error"] += 1
            return None
        fitted = truncate(example, self.seq_len, self.truncation)
        if fitted is None:
            self.skipped["too_long_dropped" if self.truncation == "drop" else "reply_truncated_away"] += 1
        elif fitted is not example:
            self.truncated += 1  # cut but still trained: reported, not a skip
        return fitted

    def _build(self) -> None:
        conversations, reports = self._conversations()
        self.truncated = 0
        pairs = []
        for messages in track(conversations, description="encoding", disable=len(conversations) < 5000):
            example = self.encode(messages)
            if example is not None:
                pairs.append((messages, example))
        self._report("sft data", len(pairs), reports)
        train, val = self._split(pairs)
        self.val_conversations = [m for m, _ in val]
        self.train_set = self._rows([e for _, e in train], "train")
        self.val_set = self._rows([e for _, e in val], "validation") if val else None

    def _rows(self, examples: list[dict], name: str) -> Dataset:
        if self.packing == "none":
            return _ListDataset(examples)
        lengths = [len(e["input_ids"]) for e in examples]
        bins = best_fit_decreasing(lengths, self.seq_len)
        rows = [pack_examples(examples, b, self.seq_len, self.tokenizer.pad_id) for b in bins]
        rank_zero_info(
            f"sft {name}: {len(examples)} examples packed into {len(rows)} rows of {self.seq_len}, "
            f"{fill_ratio(bins, lengths, self.seq_len):.1%} real tokens"
            + (f" ({self.truncated} truncated)" if name == "train" and self.truncated else "")
        )
        self.fill_ratio = fill_ratio(bins, lengths, self.seq_len) if name == "train" else getattr(self, "fill_ratio", 0.0)
        return _ListDataset(rows)

    def _collate(self, items: list) -> dict[str, torch.Tensor]:
        if self.packing == "none":
            return pad_examples(items, self.tokenizer.pad_id)
        return stack_rows(items)

    def generation_prompts(self, n: int) -> list[tuple[list[int], str]]:
        """(prompt ids ending in the assistant header, expected reply) from validation conversations."""
        self.setup("validate")
        out = []
        for messages in self.val_conversations[:n]:
            if messages[-1]["role"] == "assistant":
                out.append((self.template.encode_prompt(messages[:-1], self.tokenizer), messages[-1]["content"]))
        return out

    @property
    def stop_token_id(self) -> int:
        return self.template.stop_token_id(self.tokenizer)


class PreferenceData(StageData):
    """Prompt + chosen/rejected replies -> two masked sequences sharing the prompt's tokens.

    Batches: `chosen_{input_ids,labels,position_ids}`, `rejected_{...}` (both
    right-padded to one length so a stage can run them in one forward pass)
    and `index` (the pair's position in its split, for precomputed reference
    log-probabilities).
    """

    def __init__(
        self,
        files: list[str] | None = None,
        template: str = "chatml",
        truncation: str = "right",
        on_error: str = "raise",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.files = [Path(f) for f in files] if files else None
        self.truncation = check_choice("truncation", truncation, TRUNCATION_POLICIES)
        self.on_error = check_choice("on_error", on_error, ON_ERROR)
        self.template = ChatTemplate.get(template)

    def _pairs(self) -> tuple[list[dict], list[LoadReport]]:
        if not self.files:
            return synthetic.preference_pairs(seed=self.seed), []
        pairs, reports = [], []
        for file in self.files:
            records, report = read_preference(file, on_error=self.on_error)
            pairs += records
            reports.append(report)
        return pairs, reports

    def encode(self, pair: dict) -> dict | None:
        """A pair -> {"chosen": example, "rejected": example} sharing one prompt, or None (counted).

        Truncation treats the pair as one: `left` cuts the same oldest prompt
        tokens from both sides, so DPO always compares replies to the same context.
        """
        prompt = self.template.encode_prompt(pair["prompt"], self.tokenizer)
        replies = {side: self._completion(pair["prompt"], pair[side], len(prompt)) for side in ("chosen", "rejected")}
        longest = max(len(r["input_ids"]) for r in replies.values())
        if len(prompt) + longest > self.seq_len:
            if self.truncation == "drop":
                self.skipped["too_long_dropped"] += 1
                return None
            if self.truncation == "left":
                keep = self.seq_len - longest
                if keep < 1:
                    self.skipped["reply_truncated_away"] += 1
                    return None
                prompt = prompt[-keep:]
        sides = {}
        for side, reply in replies.items():
            example = {"input_ids": prompt + reply["input_ids"], "labels": [IGNORE_INDEX] * len(prompt) + reply["labels"]}
            fitted = truncate(example, self.seq_len, "right")
            if fitted is None:
                self.skipped["reply_truncated_away"] += 1
                return None
            sides[side] = fitted
        return sides

    def _completion(self, prompt: list[dict], messages: list[dict], prompt_len: int) -> dict:
        """The tokens after the prompt: one reply, or a multi-turn completion (its assistant turns labelled)."""
        if len(messages) == 1:
            return self.template.encode_reply(messages[0]["content"], self.tokenizer)
        full = self.template.encode(prompt + messages, self.tokenizer, loss_mask="assistant")
        # the prompt's own assistant turns are context, not the completion being preferred
        return {"input_ids": full["input_ids"][prompt_len:], "labels": full["labels"][prompt_len:]}

    def _build(self) -> None:
        pairs, reports = self._pairs()
        encoded = [e for e in (self.encode(p) for p in track(pairs, description="encoding", disable=len(pairs) < 5000)) if e]
        self._report("preference data", len(encoded), reports)
        train, val = self._split(encoded)
        self.train_set = _ListDataset([{**e, "index": i} for i, e in enumerate(train)])
        self.val_set = _ListDataset([{**e, "index": i} for i, e in enumerate(val)]) if val else None

    def _collate(self, items: list) -> dict[str, torch.Tensor]:
        length = max(len(item[side]["input_ids"]) for item in items for side in ("chosen", "rejected"))
        batch = {"index": torch.tensor([item["index"] for item in items])}
        for side in ("chosen", "rejected"):
            batch.update(pad_examples([item[side] for item in items], self.tokenizer.pad_id, length, prefix=f"{side}_"))
        return batch

    def _count(self, batch: dict) -> tuple[int, int]:
        # tokens of the chosen replies (what an SFT term trains on); sequences = pairs
        return count_targets(batch["chosen_labels"]), int(batch["chosen_labels"].shape[0])
