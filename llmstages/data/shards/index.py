"""The shard folder's format and its reader: `index.json` plus `shard-NNNNN.bin`, local or in object storage.

Design choices:
- `index.json` is written last (atomically) by `prepare`: a folder with it is complete. It holds
  per shard only its file name and counts, so it grows with the number of shards (one entry per
  ~64 MB), never with the number of tokens or documents; document boundaries are the EOS ids in
  the stream.
- Reading goes through fsspec (`url_to_fs`): a local path, `file://` or `s3://bucket/prefix`
  (s3fs; the endpoint from `storage_options` or the usual `AWS_ENDPOINT_URL[_S3]` variable, for
  S3-compatible servers). A read is one byte range of one shard: nothing is memory-mapped, so a
  process's memory is what it asked for, not the pages of every file it touched.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from llmstages.errors import UserError

INDEX = "index.json"
FORMAT = "llmstages.shards"
VERSION = 1


class ShardError(UserError, ValueError):
    """A shard folder that cannot be used as asked (another run's folder, another tokenizer, too small):
    a user error, named by folder and field."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A short key of everything that decides a tokenizer's ids (`Tokenizer.to_json`)."""
    return hashlib.sha256(tokenizer.to_json().encode()).hexdigest()[:16]


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def storage(location: str, storage_options: dict[str, Any] | None = None):
    """(fsspec filesystem, path inside it) of a local folder or URL; S3 finds its endpoint in the environment."""
    import fsspec

    options = dict(storage_options or {})
    if location.startswith(("s3://", "s3a://")) and "endpoint_url" not in options:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    fs, path = fsspec.core.url_to_fs(location, **options)
    return fs, path.rstrip("/")


class ShardSet:
    """One prepared folder (local or remote): its index and byte-range reads of token spans."""

    def __init__(self, location: str, storage_options: dict[str, Any] | None = None) -> None:
        self.location = location
        self.fs, self.path = storage(str(location), storage_options)
        try:
            raw = self.fs.cat_file(f"{self.path}/{INDEX}")
        except FileNotFoundError:
            raise ShardError(f"{location}: no {INDEX}: not a prepared shard folder, or its preparation has not "
                             f"finished (run `llmstages data prepare` to completion)") from None
        self.index = json.loads(raw)
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ShardError(f"{location}/{INDEX}: format {self.index.get('format')!r} version "
                             f"{self.index.get('version')!r}, expected {FORMAT!r} version {VERSION}")
        self.dtype = np.dtype(self.index["dtype"])
        self.shard_tokens = [int(s["tokens"]) for s in self.index["shards"]]
        self.bytes_read = 0  # for memory and traffic checks

    @property
    def key(self) -> str:
        return self.index["key"]

    def read(self, shard: int, start: int, end: int) -> np.ndarray:
        """Tokens `[start, end)` of shard `shard`: one ranged read."""
        size = self.dtype.itemsize
        name = self.index["shards"][shard]["file"]
        data = self.fs.cat_file(f"{self.path}/{name}", start=start * size, end=end * size)
        self.bytes_read += len(data)
        if len(data) != (end - start) * size:
            raise ShardError(f"{self.location}/{name}: expected {end - start} tokens from {start}, read "
                             f"{len(data) // size}: the shard is shorter than {INDEX} says")
        return np.frombuffer(data, dtype=self.dtype)
