"""PretrainData: text -> tokens (EOS after every document) -> rows of `seq_len`.

Design choices:
- Tokens are cached on disk as a memory-mapped array keyed by everything that
  decides its content (the inputs' bytes and paths, `text_mode`, `on_error`,
  the tokenizer), written atomically. A cache is never a way around
  validation: a `skip` run's cache has another key than a `raise` run's, so
  the `raise` run reads (and rejects) the bad file itself.
- Files are streamed line by line (`.txt`, `.jsonl`) or in row batches
  (`.parquet`, a `datasets.save_to_disk` folder: a `text` column) and encoded in batches
  bounded in documents and characters; a huge document is encoded in pieces
  cut where the tokenizer provably gives the same ids (`document_pieces`), so
  memory follows the longest record's text, not its token objects, and a
  corpus larger than memory is encoded once and trained on from the memory map.
- `packing: documents` keeps attention inside each document (`document_ids`);
  `concat` is the classic shortcut where attention crosses documents.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from rich.progress import Progress
from torch.utils.data import Dataset

from llmstages.data import synthetic
from llmstages.data.base import StageData
from llmstages.data.batch import LMBatch
from llmstages.data.columnar import source_files
from llmstages.data.formats import iter_text
from llmstages.data.packing import check_packing, stack_rows, stream_row
from llmstages.options import OnError, TextMode, check_choice, choices


def splits_at_spaces(tokenizer_json: str) -> bool:
    """Whether encoding a text in pieces cut before a single space between two non-spaces gives
    exactly the ids of encoding it whole.

    True for byte-level BPE with the GPT-2 pre-tokenizer regex and no prefix space or
    normalizer (llmstages' own tokenizers): no pre-token contains a space after a non-space,
    and merges never cross pre-tokens. Other tokenizers are encoded whole (correct, but their
    memory grows with the longest document).
    """
    spec = json.loads(tokenizer_json).get("tokenizer", {})
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or pre.get("type") != "ByteLevel":
        return False
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return False
    return not any(any(c.isspace() for c in t.get("content", "")) for t in spec.get("added_tokens", []))


def document_pieces(doc: str, size: int):
    """(piece, is the last) of `doc`, cut about every `size` characters before a single space
    between two non-spaces (see `splits_at_spaces`); a stretch with no such space stays whole."""
    start, n = 0, len(doc)
    while n - start > size:
        cut = doc.rfind(" ", start + 1, start + size)
        while cut > start and (doc[cut - 1].isspace() or cut + 1 >= n or doc[cut + 1].isspace()):
            cut = doc.rfind(" ", start + 1, cut)
        if cut <= start:  # no safe cut in this window: look further on
            cut = next((i for i in range(start + size, n - 1) if doc[i] == " " and not doc[i - 1].isspace()
                        and not doc[i + 1].isspace()), -1)
            if cut < 0:
                break
        yield doc[start:cut], False
        start = cut
    yield doc[start:], True


class _TokenRows(Dataset):
    def __init__(self, tokens: np.ndarray, rows: np.ndarray, seq_len: int, eos_id: int, packing: str) -> None:
        self.tokens, self.rows, self.seq_len, self.eos_id, self.packing = tokens, rows, seq_len, eos_id, packing

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = int(self.rows[i]) * self.seq_len
        return stream_row(self.tokens[start : start + self.seq_len], self.seq_len, self.eos_id, self.packing)


class PretrainData(StageData):
    """Text -> tokens (EOS after every document) -> rows of `seq_len`."""

    encode_chunk = 4096  # documents (or pieces) per `encode_batch` call
    batch_chars = 1 << 20  # ... and at most this much text: encoding holds ~300 bytes per token
    piece_chars = 1 << 18  # a longer document is encoded in pieces (see `document_pieces`)

    def __init__(
        self,
        files: list[str] | None = None,
        text_mode: TextMode = "line",
        packing: Literal["documents", "concat"] = "documents",
        on_error: OnError = "raise",
        **kwargs,
    ) -> None:
        """
        Args:
            files: `.txt`, or `.jsonl`/`.json`/`.parquet`/`datasets.save_to_disk` folders (a `text` field) corpora;
                null: the embedded synthetic corpus.
            text_mode: line (a document per line) or file (a document per file).
            packing: documents (attention and positions isolated per document) or concat (attention crosses documents).
            on_error: raise (stop at the first bad record, naming file, line and field) or skip (count and go on).
        """
        super().__init__(**kwargs)
        self.files = [Path(f) for f in files] if files else None
        self.text_mode = check_choice("text_mode", text_mode, choices(TextMode))
        self.on_error = check_choice("on_error", on_error, choices(OnError))
        self.packing = check_packing(packing, ("documents", "concat"))

    def token_cache(self) -> Path:
        """Encode the corpus once; later runs with the same inputs and tokenizer reuse the file."""
        tok_json = self.tokenizer.to_json()
        if self.files:
            key = file_digest(self.files, f"{self.text_mode}|on_error={self.on_error}|{tok_json}")
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
        if self.files:
            total = sum(p.stat().st_size for f in self.files for p in source_files(f))
        else:
            total = sum(len(d) for d in docs)
        split = splits_at_spaces(tok_json)
        with open(tmp, "wb") as out, Progress(disable=total < 10_000_000) as progress:
            task = progress.add_task("tokenising", total=total)
            batch: list[tuple[str, bool]] = []  # (text, ends its document)
            chars = 0

            def flush() -> None:
                nonlocal chars
                encoded = self.tokenizer.encode_batch([t for t, _ in batch])
                # one array and one write per batch (a write per document dominated short-line corpora)
                flat = itertools.chain.from_iterable(ids + [eos] if last else ids for ids, (_, last) in zip(encoded, batch))
                np.fromiter(flat, dtype=dtype).tofile(out)
                progress.advance(task, chars)
                batch.clear()
                chars = 0

            for source in sources:
                for doc in source:
                    for piece, last in (document_pieces(doc, self.piece_chars) if split else [(doc, True)]):
                        batch.append((piece, last))
                        chars += len(piece)
                        if len(batch) >= self.encode_chunk or chars >= self.batch_chars:
                            flush()
                    n_docs += 1
            flush()
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

    def collate(self, items: list) -> LMBatch:
        return stack_rows(items)


def file_digest(paths: list[Path], extra: str) -> str:
    """A short key of the files (paths and bytes) and `extra`: the encoded corpus cache's name."""
    h = hashlib.sha256(extra.encode())
    for source in paths:
        for path in source_files(source):  # a save_to_disk folder: its state and Arrow files
            h.update(str(path.resolve()).encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]
