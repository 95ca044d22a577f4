"""`llmstages data prepare`: text inputs -> token shards of a fixed size plus `index.json`, once.

Design choices:
- The same readers, validation, `text_mode` and `on_error` as `PretrainData` (`formats.iter_text`),
  and the same ids: EOS after every document, a long document encoded in pieces only where the
  tokenizer provably gives the same ids (`pretrain.document_pieces`).
- Parallel and deterministic: the main process reads documents and cuts them into chunks (by
  document count and characters, never by worker count); worker processes encode chunks; the
  main process writes their tokens in chunk order, cut into shards of exactly `shard_tokens`.
  So 1 or N workers write the same bytes. At most `2 x workers` chunks are in flight: memory
  does not grow with the corpus.
- Resumable: each shard is written to a temporary name and renamed, then its `.json` (counts and
  where the next shard starts: chunk number and tokens of it already written) is renamed beside
  it: a shard with its `.json` is complete. A rerun keeps the complete shards, reads the inputs
  again without encoding the chunks already written, and continues. `index.json` comes last.
- Keyed like `PretrainData`'s cache (the inputs' paths and bytes, `text_mode`, `on_error`, the
  tokenizer, `shard_tokens`): the key is written to `prepare.json` first, and a folder holding
  another key (or files that are not ours) is refused, so shards of two corpora never mix.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llmstages.data.columnar import source_files
from llmstages.data.formats import iter_text
from llmstages.data.pretrain import document_pieces, file_digest, splits_at_spaces
from llmstages.data.shards.index import FORMAT, INDEX, VERSION, ShardError, shard_name, tokenizer_fingerprint

DEFAULT_SHARD_TOKENS = 1 << 25  # 32 Mi tokens: 64 MB of uint16 per shard
CLAIM = "prepare.json"
CHUNK_DOCS = 2048  # documents per chunk handed to a worker
CHUNK_CHARS = 1 << 20  # ... and about this much text
ENCODE_CHARS = 1 << 20  # text per encode_batch call inside a worker
PIECE_CHARS = 1 << 18  # a longer document is encoded in pieces


# --------------------------------------------------------------------------- encoding (worker side)

_worker: dict = {}


def _init_worker(tokenizer, dtype: str, split: bool, threads: bool = False) -> None:
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core: no threads inside
    _worker.update(tokenizer=tokenizer, dtype=np.dtype(dtype), split=split)


def encode_chunk(docs: list[str]) -> np.ndarray:
    """A chunk's tokens: each document's ids followed by EOS (in pieces where that gives the same ids)."""
    tokenizer, dtype, split = _worker["tokenizer"], _worker["dtype"], _worker["split"]
    eos = tokenizer.eos_id
    parts: list[np.ndarray] = []
    batch: list[tuple[str, bool]] = []
    chars = 0

    backend = tokenizer.backend
    # the same ids as `Tokenizer.encode_batch` (its backend, no special tokens added), without character offsets
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def flush() -> None:
        nonlocal chars
        if batch:
            encoded = encode([t for t, _ in batch], add_special_tokens=False)
            flat = itertools.chain.from_iterable(e.ids + [eos] if last else e.ids for e, (_, last) in zip(encoded, batch))
            parts.append(np.fromiter(flat, dtype=dtype))
        batch.clear()
        chars = 0

    for doc in docs:
        for piece, last in (document_pieces(doc, PIECE_CHARS) if split else [(doc, True)]):
            batch.append((piece, last))
            chars += len(piece)
            if chars >= ENCODE_CHARS:
                flush()
    flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


# --------------------------------------------------------------------------- the command's work


def chunks(sources) -> Iterator[list[str]]:
    """Documents of all sources in order, grouped by CHUNK_DOCS / CHUNK_CHARS (independent of workers)."""
    chunk: list[str] = []
    chars = 0
    for doc in itertools.chain.from_iterable(sources):
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def prepare_shards(
    files: list[str | Path], tokenizer, out: str | Path, *, text_mode: str = "line", on_error: str = "raise",
    shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None, progress: bool = True,
) -> Path:
    """Tokenise `files` into shards under `out` (see the module docstring); returns `out`.

    `workers`: encoding processes (default: the CPUs this process may use); 1 encodes in this process.
    """
    from rich.progress import Progress

    files = [Path(f) for f in files]
    if not files:
        raise ShardError("no input files")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f}: no such file or folder")
    if shard_tokens < 1:
        raise ShardError(f"shard_tokens must be >= 1, got {shard_tokens}")
    out = Path(out)
    tok_json = tokenizer.to_json()
    key = file_digest(files, f"shards|{text_mode}|on_error={on_error}|shard_tokens={shard_tokens}|{tok_json}")
    if _claim(out, key, files):
        return out  # already complete for these inputs and this tokenizer
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32)
    done = _complete_shards(out)
    start_chunk, skip = (done[-1]["next_chunk"], done[-1]["next_skip"]) if done else (0, 0)
    workers = workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    sources = [iter_text(f, mode=text_mode, on_error=on_error) for f in files]
    total = sum(p.stat().st_size for f in files for p in source_files(f))
    split = splits_at_spaces(tok_json)

    shards = [{"file": d["file"], "tokens": d["tokens"], "documents": d["documents"]} for d in done]
    buffer = np.empty(shard_tokens, dtype=dtype)
    fill = 0
    with Progress(disable=not progress) as bar:
        task = bar.add_task("tokenising" + (f" (resuming after shard {len(done) - 1})" if done else ""), total=total)
        for number, (docs, tokens) in enumerate(_encoded(chunks(sources), start_chunk, tokenizer, dtype, split,
                                                         workers, bar, task)):
            c = start_chunk + number
            offset = skip if number == 0 else 0
            tokens = tokens[offset:]
            pos = 0
            while pos < len(tokens):
                take = min(shard_tokens - fill, len(tokens) - pos)
                buffer[fill : fill + take] = tokens[pos : pos + take]
                fill, pos = fill + take, pos + take
                if fill == shard_tokens:
                    nxt = (c, offset + pos) if pos < len(tokens) else (c + 1, 0)
                    shards.append(_write_shard(out, len(shards), buffer[:fill], tokenizer.eos_id, nxt))
                    fill = 0
        if fill:
            shards.append(_write_shard(out, len(shards), buffer[:fill], tokenizer.eos_id, (None, 0)))
        bar.update(task, completed=total)  # advanced by characters, sized in bytes
    skipped: dict[str, int] = {}
    for source in sources:
        for reason, n in source.report.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    index = {
        "format": FORMAT, "version": VERSION, "key": key, "tokenizer": tokenizer_fingerprint(tokenizer),
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": dtype.name,
        "documents_end_with": "eos", "text_mode": text_mode, "on_error": on_error, "shard_tokens": shard_tokens,
        "inputs": [str(f) for f in files], "tokens": sum(s["tokens"] for s in shards),
        "documents": sum(s["documents"] for s in shards), "kept": sum(s.report.kept for s in sources),
        "skipped": skipped, "shards": shards,
    }
    if index["tokens"] == 0:
        raise ShardError(f"{', '.join(map(str, files))}: no tokens (no usable documents)")
    _write_json(out / INDEX, index)
    return out


def _encoded(chunk_iter, start_chunk: int, tokenizer, dtype, split: bool, workers: int, bar, task):
    """(documents, tokens) of every chunk from `start_chunk` on, in order; the earlier ones are read, not encoded."""
    for docs in itertools.islice(chunk_iter, start_chunk):
        bar.advance(task, sum(len(d) for d in docs))
    if workers == 1:
        _init_worker(tokenizer, dtype.name, split, threads=True)  # in this process: the backend's threads
        for docs in chunk_iter:
            yield docs, encode_chunk(docs)
            bar.advance(task, sum(len(d) for d in docs))
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer, dtype.name, split)) as pool:
        pending: deque = deque()
        for docs in chunk_iter:  # bounded: Pool.imap would read the whole corpus ahead
            pending.append((docs, pool.apply_async(encode_chunk, (docs,))))
            if len(pending) >= 2 * workers:
                done_docs, result = pending.popleft()
                yield done_docs, result.get()
                bar.advance(task, sum(len(d) for d in done_docs))
        while pending:
            done_docs, result = pending.popleft()
            yield done_docs, result.get()
            bar.advance(task, sum(len(d) for d in done_docs))


def _write_shard(out: Path, number: int, tokens: np.ndarray, eos: int, nxt: tuple[int | None, int]) -> dict:
    name = shard_name(number)
    tmp = out / f".{name}.tmp{os.getpid()}"
    tokens.tofile(tmp)
    os.replace(tmp, out / name)
    meta = {"file": name, "tokens": int(len(tokens)), "documents": int(np.count_nonzero(tokens == eos)),
            "next_chunk": nxt[0], "next_skip": nxt[1]}
    _write_json(out / (name + ".json"), meta)  # after the tokens: a shard with its .json is complete
    return {k: meta[k] for k in ("file", "tokens", "documents")}


def _complete_shards(out: Path) -> list[dict]:
    """The metadata of shards 0..k that a previous (killed) run completed, in order."""
    done = []
    for number in itertools.count():
        meta, data = out / (shard_name(number) + ".json"), out / shard_name(number)
        if not (meta.is_file() and data.is_file()):
            break
        record = json.loads(meta.read_text())
        if record.get("next_chunk") is None:  # the last shard of a finished run whose index was not written
            break
        done.append(record)
    return done


def _claim(out: Path, key: str, files: list[Path]) -> bool:
    """Make `out` this preparation's folder; True when it already holds the finished shards."""
    claim = out / CLAIM
    if claim.is_file():
        theirs = json.loads(claim.read_text()).get("key")
        if theirs != key:
            raise ShardError(
                f"{out}: holds shards of other inputs, options or tokenizer (key {theirs}, these give {key}); "
                "choose another --out, or delete the folder to prepare it again"
            )
        return (out / INDEX).is_file()
    if out.exists() and any(out.iterdir()):
        raise ShardError(f"{out}: not empty and not a shard folder ({CLAIM} missing); choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(claim, {"key": key, "inputs": [str(f) for f in files]})
    return False


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)
