"""Columnar sources: Parquet files and `datasets.save_to_disk` folders, read as rows of plain Python values.

Design choices:

- The readers in `formats` validate records; this module only opens a columnar
  source and hands its rows on as the objects JSON would give (`dict`, `list`,
  `str`, numbers), so every record rule, error and `on_error` policy is the one
  the JSON readers apply. Rows are numbered from 0 across the whole source (a
  `save_to_disk` folder's Arrow files are one table, as `dataset[i]` counts).
- Read in row batches with `pyarrow` alone: Parquet through
  `ParquetFile.iter_batches` (one row group at a time, without pyarrow's
  default pre-buffering, through a 1 MiB read buffer: on a 197 MB file
  Arrow's peak allocation stays at 5 MiB where the defaults hold the whole
  file), a `save_to_disk` folder (Arrow IPC stream files listed in its
  `state.json`) through a memory-mapped stream reader. A big source is never
  loaded whole, and `datasets` is not a dependency.
- A null is an absent field. Arrow holds one schema for every row, so a key
  that some JSON records lack (a `system` prompt, a message's `tool_calls`, one
  tool's `arguments`) is a null in the other rows; dropping nulls from objects
  gives back each record as it was written. Nulls inside a list stay (JSON has
  no absent list item), and a required field that is null is reported missing.
- pyarrow is imported when a columnar source is read, not when this module is:
  the command-line help and the JSON readers never pay for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["BATCH_ROWS", "TableError", "is_columnar", "rows", "source_files"]

BATCH_ROWS = 1024  # rows converted to Python at a time: memory follows a batch, not the file
_READ_BUFFER = 1 << 20  # bytes read from a Parquet file at a time

_STATE = "state.json"  # what `datasets.Dataset.save_to_disk` writes beside its Arrow files
_DICT = "dataset_dict.json"  # ... and `DatasetDict.save_to_disk` above its split folders


class TableError(Exception):
    """A columnar source that cannot be read at all (not Parquet, a broken folder); `formats` adds the path."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def is_columnar(path: Path) -> bool:
    """Whether `path` is a Parquet file or a folder (read as a `save_to_disk` folder)."""
    return path.suffix.lower() == ".parquet" or path.is_dir()


def source_files(path: Path) -> list[Path]:
    """The files whose bytes make up the source, in a stable order (for cache keys and sizes); a folder's
    files are all listed without reading them, so a broken folder is reported by `rows`, not here."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def rows(path: Path, batch_rows: int = BATCH_ROWS) -> Iterator[tuple[int, Any]]:
    """(0-based row, the row as a JSON-like dict) of a Parquet file or a `save_to_disk` folder."""
    index = 0
    for batch in _batches(path, batch_rows):
        for row in batch.to_pylist(maps_as_pydicts="lossy"):
            yield index, _drop_nulls(row)
            index += 1


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _batches(path: Path, batch_rows: int) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_dir():
        for file in _arrow_files(path):
            try:
                with pa.memory_map(str(file)) as source:
                    yield from pa.ipc.open_stream(source)
            except (pa.ArrowInvalid, OSError) as err:
                raise TableError("unreadable_file", f"{file.name}: not an Arrow stream file ({err})") from None
        return
    try:
        # pyarrow's defaults read a whole file (pre_buffer) or a whole column chunk (buffer_size=0) first:
        # a streamed read with a bounded buffer keeps memory at a batch even for one huge row group.
        table = pq.ParquetFile(path, pre_buffer=False, buffer_size=_READ_BUFFER)
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError) as err:
        raise TableError("unreadable_file", f"not a Parquet file ({err})") from None
    try:
        for group in range(table.num_row_groups):
            yield from table.iter_batches(batch_size=batch_rows, row_groups=[group])
    except (pa.ArrowInvalid, OSError) as err:
        raise TableError("unreadable_file", f"a broken Parquet file ({err})") from None


def _arrow_files(folder: Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` folder, in order, from its `state.json`."""
    state_path = folder / _STATE
    if not state_path.is_file():
        if (folder / _DICT).is_file():
            splits = [str(s) for s in _json(folder / _DICT).get("splits") or []]
            example = f", e.g. {folder / splits[0]}" if splits else ""
            detail = f"a DatasetDict folder (splits: {', '.join(splits) or 'none'}); give one split's folder{example}"
            raise TableError("unsupported_folder", detail)
        raise TableError("unsupported_folder", f"a folder without {_STATE}: expected a datasets.save_to_disk folder "
                                               "(or give a .parquet, .jsonl or .json file)")
    files = _json(state_path).get("_data_files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str)
                                              for f in files):
        raise TableError("unsupported_folder", f"{_STATE} has no '_data_files' list of {{'filename'}} entries")
    out = [folder / f["filename"] for f in files]
    for file in out:
        if not file.is_file():
            raise TableError("unsupported_folder", f"{_STATE} lists {file.name}, which is not in the folder")
    return out


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TableError("unsupported_folder", f"{path.name} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise TableError("unsupported_folder", f"{path.name} does not hold an object")
    return value
