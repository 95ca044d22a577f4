"""Record fields, shared by the readers: typed getters, JSON-in-a-string values, and fields no reader uses.

Design choices:

- `Invalid` is a record-level problem (reason, field, detail); the read loop in
  `formats` adds the file and the line or record index and applies `on_error`.
- `UnusedFields`: a field a reader does not use is never dropped silently. Under
  `on_error="raise"` it is an error naming it (unless it is a bookkeeping name in
  `IGNORABLE_FIELDS`); otherwise it is counted per field (indices folded to
  `[]`) for the load report. The reader in progress is `UnusedFields.current`,
  so the parsers call `unused(record, used_keys, base)` without threading it through.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Collection
from typing import Any, ClassVar

__all__ = [
    "IGNORABLE_FIELDS",
    "Invalid",
    "UnusedFields",
    "as_object",
    "json_type",
    "json_value",
    "opt_str",
    "req_list",
    "req_str",
    "unused",
    "wrong_type",
]


class Invalid(Exception):
    """A record-level problem; the read loop adds the file and index."""

    def __init__(self, reason: str, field: str | None = None, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.field, self.detail = reason, field, detail


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def wrong_type(field: str | None, expected: str, value: Any) -> Invalid:
    return Invalid("wrong_type", field, f"expected {expected}, got {json_type(value)}")


def as_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise wrong_type(None, "a JSON object", value)
    return value


def req_str(rec: dict[str, Any], key: str, field: str | None = None) -> str:
    if key not in rec:
        raise Invalid("missing_field", field or key)
    value = rec[key]
    if not isinstance(value, str):
        raise wrong_type(field or key, "string", value)
    return value


def opt_str(rec: dict[str, Any], key: str) -> str:
    """An optional string field; absent and null both read as ""."""
    value = rec.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise wrong_type(key, "string", value)
    return value


def req_list(rec: dict[str, Any], key: str) -> list[Any]:
    if key not in rec:
        raise Invalid("missing_field", key)
    value = rec[key]
    if not isinstance(value, list):
        raise wrong_type(key, "array", value)
    return value


# Field names a reader may meet and never uses: counted and named in the load report, never an error.
IGNORABLE_FIELDS = frozenset({"id", "idx", "index", "uuid", "source", "dataset", "category", "meta", "metadata", "lang", "language"})


class UnusedFields:
    """Fields a record holds and the reader does not use: an error under on_error="raise" (unless
    the name is in IGNORABLE_FIELDS), else counted per field in the report (`LoadReport.ignored`)."""

    current: ClassVar[UnusedFields | None] = None

    def __init__(self, ignored: Counter[str], on_error: str) -> None:
        self.ignored, self.on_error = ignored, on_error  # the report's counter: field -> kept records holding it
        self.pending: Counter[str] = Counter()

    def check(self, rec: dict[str, Any], used: Collection[str], base: str | None = None) -> None:
        for key in rec:
            if key in used:
                continue
            name = f"{base}.{key}" if base else key
            if key not in IGNORABLE_FIELDS and self.on_error == "raise":
                raise Invalid("unknown_field", name, f"this reader does not use it (it reads: {', '.join(sorted(used))})")
            self.pending[re.sub(r"\[\d+\]", "[]", name)] += 1

    def commit(self, kept: bool) -> None:
        if kept:
            self.ignored.update(self.pending)
        self.pending.clear()


def unused(rec: dict[str, Any], used: Collection[str], base: str | None = None) -> None:
    """Check `rec`'s keys against `used` for the reader in progress (nothing outside a read)."""
    if UnusedFields.current is not None:
        UnusedFields.current.check(rec, used, base)


def json_value(value: Any, field: str) -> Any:
    """A value that datasets often store as a JSON string: parsed, with the field named when it is not JSON."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise Invalid("invalid_json", field, f"{err.msg} (column {err.colno})") from None
