"""Dataset readers: files in, plain validated Python records out.

Design choices:

- Records are plain data, never tokens: a text document is a `str`, a chat
  conversation is a `list[Message]` (`{"role", "content"}`, roles
  system/user/assistant, defined once in `data/chat/messages.py`), a preference pair is a
  `PreferencePair` of three message lists. Templates tokenise; losses live
  elsewhere.
- Strict by default. `on_error="raise"` stops at the first bad record, before
  any training; `on_error="skip"` drops bad records and counts them per reason
  in a `LoadReport`, so nothing disappears silently. Zero kept records is
  always an error (`empty_dataset`): never a silent empty epoch.
- Exact locations. Files are read as bytes and decoded line by line, so a
  `not_utf8` or `invalid_json` error names the 1-based line of a `.jsonl` or
  `.txt`. Records of a `.json` array are named by 0-based index. Errors that
  make a whole `.json` file unreadable (bad JSON, bad bytes, not an array)
  raise in both modes: there is no record boundary to skip to.
- Columnar sources (`.parquet`, a `datasets.save_to_disk` folder) are opened by
  `columnar.py` and give their rows, named by 0-based row, to the same parsers:
  the same records, errors and `on_error` as the JSON form of the same data.
- Content is never rewritten: whitespace only decides emptiness. Two
  deliberate exceptions: alpaca joins `instruction` and `input` with "\\n",
  and empty system prompts (`"system": ""` is common in exports) are
  dropped rather than rejected.
- Field helpers live in `record_fields.py` (typed getters, `Invalid`, fields no
  reader uses) and the parts of a message beyond role and text in
  `message_parts.py` (content parts, tool calls, tool schemas, weights); this
  module reads files and applies the record and turn rules.
- Tools: a record's `tools` (a list of function schemas, or a JSON string of
  one) makes the conversation a `Conversation` carrying them; OpenAI
  `tool_calls` (arguments an object or a JSON string, parsed so every template
  renders the same object) and `tool` messages are read as written. ShareGPT
  follows LLaMA-Factory: `function_call` is an assistant turn whose value is
  the call (the model learns to emit it), `observation` a `tool` message (the
  result is context). A tool result with no call before it is an error.
- Reasoning: inline `<think>` in an assistant's content is kept as written (the
  template parses it); `reasoning_content` is read; `<think>` in a user, system
  or tool message is an error (`reasoning_marker`).
- Content parts (`[{"type": "text", "text"}]`, LLaMA-Factory v1's `{"type",
  "value"}` with `reasoning` and `tool_call` parts) are read; any other part
  type (image, audio) is an error naming it, never skipped.
- `weight` (OpenAI) or `loss_weight` (LLaMA-Factory v1), 0 or 1, on an
  assistant message: 0 keeps the reply as context.
- No field dropped silently: a field a reader does not use is an error under
  `on_error="raise"`; under `skip`, and for bookkeeping names
  (`IGNORABLE_FIELDS`: `id`, `source`...) always, it is counted per field in
  `LoadReport.ignored` and named in the summary.
- Structure rules: roles known; system only as the first turn; at least one
  assistant turn with weight 1; no two assistant or two user turns in a row
  (an assistant turn of tool calls may follow a reply); assistant replies
  (content or tool calls) and user turns non-empty. A trailing user turn is allowed (it is
  prompt, so it never carries a loss under the default mask, and a chat that
  ends on a user turn is exactly a generation prompt for evaluation).
  `read_chat` rejects preference records (`format_mismatch`) instead of
  reading their prompt as a conversation.
- Prompts (online RL, the generate tool) are `PromptRecord`s: messages that
  end with a user turn plus an optional reference `answer` and `task`.
  `read_prompts` reads `{"prompt", "answer"}` records, chat conversations cut
  before their final assistant turn (its content is the answer), or one prompt
  per line (`lines`: a `.jsonl` row with `messages` or `prompt`, any other
  file's line a user message), all under the rules above.
- Preference pairs must end their prompt with a user turn; chosen/rejected
  start and end with an assistant turn. An identical chosen/rejected pair
  (exact message equality) is a bad record (`identical_pair`): its DPO
  gradient is exactly zero, it only dilutes the normalisation.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypedDict

from llmstages.data import columnar
from llmstages.data.chat.messages import ROLES, Conversation, Message, Role, tools_of
from llmstages.data.message_parts import REASONING_MARKERS, content_parts, message_weight, read_tools, tool_call
from llmstages.data.record_fields import (
    Invalid,
    UnusedFields,
    as_object,
    json_type,
    json_value,
    opt_str,
    req_list,
    req_str,
    unused,
    wrong_type,
)
from llmstages.errors import UserError
from llmstages.options import OnError, choices

__all__ = [
    "CHAT_FORMATS",
    "DataFormatError",
    "KTOExample",
    "LoadReport",
    "PROMPT_FORMATS",
    "PreferencePair",
    "PromptFormat",
    "PromptRecord",
    "prompt_record",
    "read_chat",
    "read_kto",
    "read_preference",
    "read_prompts",
    "read_text",
]


class PreferencePair(TypedDict):
    prompt: list[Message]  # ends with a user turn; may hold earlier turns and a system prompt
    chosen: list[Message]  # starts and ends with an assistant turn (normally one message)
    rejected: list[Message]


class PromptRecord(TypedDict):
    messages: list[Message]  # ends with a user turn; may hold earlier turns and a system prompt
    answer: str | None  # the reference reply, when the source has one
    task: str | None  # a task name for per-task rewards and metrics
    text: str | None  # the prompt as the file wrote it when that was one plain string, else None


CHAT_FORMATS = ("alpaca", "sharegpt", "messages")
PromptFormat = Literal["auto", "prompt", "alpaca", "sharegpt", "messages", "lines"]
PROMPT_FORMATS: tuple[str, ...] = choices(PromptFormat)
ON_ERROR = choices(OnError)

# ShareGPT `from` values -> roles. Tool roles use LLaMA-Factory's semantics.
_SHAREGPT_ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
}
_MESSAGE_ROLES: dict[str, Role] = {role: role for role in ROLES}  # type: ignore[misc]

# Human wording for the reasons whose key alone reads badly.
_REASON_TEXT = {
    "invalid_json": "invalid JSON",
    "not_utf8": "not valid UTF-8",
    "empty_dataset": "no usable records",
    "no_assistant": "no assistant turn",
    "misplaced_system": "system turn not first",
    "prompt_not_user": "prompt does not end with a user turn",
    "identical_pair": "chosen and rejected are identical",
    "no_prompt": "expected an object with 'messages' (a list) or 'prompt' (a str)",
}


class DataFormatError(UserError, ValueError):
    """A file or record that cannot be used, with where and why.

    `index` is a 1-based line number when `index_kind == "line"` (`.jsonl`,
    `.txt`, or a whole `.json` file that fails to parse), a 0-based record
    index into a `.json` array when `index_kind == "record"` and a 0-based row
    of a Parquet file or `save_to_disk` folder when `index_kind == "row"`; `None` for
    file-level errors. `field` is a path such as `conversations[2].value`.
    `reason` is a short machine-readable key (see `LoadReport.skipped`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        index: int | None,
        field: str | None,
        reason: str,
        detail: str | None = None,
        *,
        index_kind: Literal["line", "record", "row"] = "line",
    ) -> None:
        self.path = Path(path)
        self.index = index
        self.field = field
        self.reason = reason
        self.detail = detail
        self.index_kind = index_kind
        super().__init__(self._format())

    def _format(self) -> str:
        if self.index is None:
            where = f"{self.path}"
        elif self.index_kind == "line":
            where = f"{self.path}:{self.index}"
        else:
            where = f"{self.path}: {self.index_kind} {self.index} (0-based)"
        text = _REASON_TEXT.get(self.reason, self.reason.replace("_", " "))
        if self.index_kind == "row" and self.reason == "missing_field":
            text = "missing or null field"  # a column holds a null where a JSON record lacks the key
        if self.detail:
            text = f"{text}: {self.detail}"
        if self.field:
            return f"{where}: field {self.field!r}: {text}"
        return f"{where}: {text}"

    def __reduce__(self) -> tuple[Any, ...]:
        # The custom __init__ breaks default exception pickling (DataLoader workers, DDP).
        return (
            _rebuild_error,
            (self.path, self.index, self.field, self.reason, self.detail, self.index_kind),
        )


def _rebuild_error(
    path: Path, index: int | None, field: str | None, reason: str, detail: str | None, kind: Any
) -> DataFormatError:
    return DataFormatError(path, index, field, reason, detail, index_kind=kind)


@dataclass
class LoadReport:
    """What a reader kept and what it skipped (reason -> count)."""

    path: Path
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)
    format: str | None = None  # the chat/preference format read, when there is one
    ignored: Counter[str] = field(default_factory=Counter)  # fields of kept records no reader uses -> count

    MAX_ERRORS: ClassVar[int] = 5

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line for the log, e.g. `train.jsonl: kept 998, skipped 2 (empty_reply: 1, ...)`."""
        line = f"{self.path.name}: kept {self.kept}, skipped {self.num_skipped}"
        if self.skipped:
            # Most frequent first; ties alphabetical so the line is stable.
            parts = sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))
            line += " (" + ", ".join(f"{k}: {v}" for k, v in parts) + ")"
        if self.ignored:
            fields = sorted(self.ignored.items(), key=lambda kv: (-kv[1], kv[0]))
            line += "; ignored fields: " + ", ".join(f"{k} ({v})" for k, v in fields)
        return line


# --------------------------------------------------------------------------- reading


_BOM = "\ufeff"


def _bad_bytes_detail(err: UnicodeDecodeError, line_start: int = 0) -> str:
    col = err.start - line_start + 1
    return f"byte 0x{err.object[err.start]:02x} at byte column {col}"


def _lines(path: Path) -> Iterator[tuple[int, str | DataFormatError]]:
    """(1-based line number, decoded line or a not_utf8 error); line endings removed.

    Streams the file, so a corpus larger than memory can be read line by line. One line
    costs its bytes and its text, once each: the ending is cut by decoding a view of the
    bytes (no stripped copy), and the bytes are released before the text is handed on.
    """
    with open(path, "rb") as handle:
        for number, chunk in enumerate(handle, start=1):
            end = len(chunk)
            if end and chunk[end - 1] == 0x0A:
                end -= 1
            if end and chunk[end - 1] == 0x0D:
                end -= 1
            try:
                line = str(memoryview(chunk)[:end], "utf-8")
            except UnicodeDecodeError as err:
                yield number, DataFormatError(path, number, None, "not_utf8", _bad_bytes_detail(err))
                continue
            finally:
                del chunk
            if number == 1 and line.startswith(_BOM):
                line = line[1:]
            yield number, line


def _whole_text(path: Path) -> str:
    """The whole file decoded; a bad byte raises with its exact line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        raise DataFormatError(
            path, line, None, "not_utf8", _bad_bytes_detail(err, line_start)
        ) from None
    return text[1:] if text.startswith(_BOM) else text


# (index, index_kind, parsed JSON value or a per-record error)
_Raw = tuple[int, Literal["line", "record", "row"], Any]


def _records(path: Path) -> Iterator[_Raw]:
    """The records of a JSON, JSON Lines or columnar source (see `columnar.py`)."""
    if not columnar.is_columnar(path):
        yield from _json_records(path)
        return
    try:
        for row, value in columnar.rows(path):
            yield row, "row", value
    except columnar.TableError as err:
        raise DataFormatError(path, None, None, err.reason, err.detail) from None


def _json_records(path: Path) -> Iterator[_Raw]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for number, line in _lines(path):
            if isinstance(line, DataFormatError):
                yield number, "line", line
            elif line.strip():  # blank lines separate nothing and are not records
                try:
                    yield number, "line", json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, "line", DataFormatError(
                        path, number, None, "invalid_json", f"{err.msg} (column {err.colno})"
                    )
    elif suffix == ".json":
        text = _whole_text(path)
        if not text.strip():
            return  # an empty file: the caller reports empty_dataset
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            detail = f"{err.msg} (column {err.colno})"
            if err.msg == "Extra data":
                detail += "; this looks like JSON Lines, name the file .jsonl"
            raise DataFormatError(path, err.lineno, None, "invalid_json", detail) from None
        if not isinstance(data, list):
            raise DataFormatError(
                path, None, None, "wrong_type", f"a .json file must hold an array of records, got {json_type(data)}"
            )
        for i, value in enumerate(data):
            yield i, "record", value
    else:
        raise DataFormatError(
            path, None, None, "unsupported_extension",
            f"expected .jsonl, .json, .parquet or a datasets.save_to_disk folder, got {path.suffix!r}",
        )


class _Collector:
    """Applies the on_error policy and builds the LoadReport."""

    def __init__(self, path: Path, on_error: str) -> None:
        self.path, self.on_error = path, on_error
        self.items: list[Any] = []
        self.report = LoadReport(path=path)
        self.unused = UnusedFields(self.report.ignored, on_error)

    def reject(self, err: DataFormatError) -> None:
        if self.on_error == "raise":
            raise err from None  # the internal Invalid adds nothing to the traceback
        self.report.skipped[err.reason] += 1
        if len(self.report.first_errors) < LoadReport.MAX_ERRORS:
            self.report.first_errors.append(str(err))

    def stream(self, records: Iterator[_Raw], parse: Callable[[Any], Any]) -> Iterator[Any]:
        """Parsed items one at a time; bad records follow the on_error policy."""
        for index, kind, value in records:
            if isinstance(value, DataFormatError):
                self.reject(value)
                continue
            outer, UnusedFields.current = UnusedFields.current, self.unused
            try:
                item = parse(value)
            except Invalid as bad:
                self.unused.commit(kept=False)
                err = DataFormatError(self.path, index, bad.field, bad.reason, bad.detail, index_kind=kind)
                self.reject(err)
                continue
            finally:
                UnusedFields.current = outer
            self.unused.commit(kept=True)
            self.report.kept += 1
            yield item

    def run(self, records: Iterator[_Raw], parse: Callable[[Any], Any]) -> None:
        self.items.extend(self.stream(records, parse))

    def finish(self) -> tuple[list[Any], LoadReport]:
        self.report.kept = len(self.items)
        self.check_not_empty()
        return self.items, self.report

    def check_not_empty(self) -> None:
        if not self.report.kept:
            if self.report.skipped:
                detail = self.report.summary()
                if self.report.first_errors:
                    detail += f"; first error: {self.report.first_errors[0]}"
            else:
                detail = "the file holds no records"
            raise DataFormatError(self.path, None, None, "empty_dataset", detail)


def _check_policy(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


# --------------------------------------------------------------------------- conversations


@dataclass
class _Turn:
    """A message plus the source fields to blame for it; `extra` holds its optional `Message` fields."""

    role: Role
    content: str
    role_field: str | None
    content_field: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_calls(self) -> bool:
        return bool(self.extra.get("tool_calls"))


def _role_turn(
    item: Any, base: str, role_key: str, content_key: str, roles: dict[str, Role]
) -> _Turn:
    if not isinstance(item, dict):
        raise wrong_type(base, "an object", item)
    role_field, content_field = f"{base}.{role_key}", f"{base}.{content_key}"
    name = req_str(item, role_key, role_field)
    if name not in roles:
        raise Invalid("unknown_role", role_field, f"{name!r} (known: {', '.join(roles)})")
    role = roles[name]
    sharegpt = role_key == "from"
    used = {role_key, content_key, "weight", "loss_weight"}
    calls_only = role == "assistant" and not sharegpt and bool(item.get("tool_calls"))
    if content_key not in item and not calls_only:  # OpenAI may omit content beside tool_calls (Parquet: a null)
        raise Invalid("missing_field", content_field)
    raw = item.get(content_key)
    if role == "assistant" and raw is None and not sharegpt:
        raw = ""  # OpenAI writes null content beside tool_calls
    content, extra = content_parts(raw, content_field, role)
    if sharegpt and name == "function_call":  # LLaMA-Factory: the value is the call (or a list of calls)
        calls = json_value(content, content_field)
        calls = calls if isinstance(calls, list) else [calls]
        extra["tool_calls"] = [tool_call(c, f"{content_field}[{j}]" if len(calls) > 1 else content_field)
                               for j, c in enumerate(calls)]
        content = ""
    if not sharegpt:
        used |= {"reasoning_content", "tool_calls", "tool_call_id", "name"}
        if role == "assistant" and item.get("reasoning_content") is not None:
            extra["reasoning_content"] = req_str(item, "reasoning_content", f"{base}.reasoning_content")
        if role == "assistant" and item.get("tool_calls"):
            calls = item["tool_calls"]
            if not isinstance(calls, list):
                raise wrong_type(f"{base}.tool_calls", "an array of tool calls", calls)
            extra["tool_calls"] = [tool_call(c, f"{base}.tool_calls[{j}]") for j, c in enumerate(calls)]
        for key in ("tool_call_id", "name"):
            if role == "tool" and item.get(key) is not None:
                extra[key] = req_str(item, key, f"{base}.{key}")
        if role != "assistant" and item.get("tool_calls"):
            raise Invalid("wrong_role", f"{base}.tool_calls", f"tool calls in a {role} message")
    weight = message_weight(item, base)
    if weight is not None and role == "assistant":
        extra["weight"] = weight
    unused(item, used, base)
    return _Turn(role, content, role_field, content_field, extra)


def _turn_list(
    items: Any, base: str, role_key: str, content_key: str, roles: dict[str, Role]
) -> list[_Turn]:
    if not isinstance(items, list):
        raise wrong_type(base, "array", items)
    return [_role_turn(x, f"{base}[{i}]", role_key, content_key, roles) for i, x in enumerate(items)]


def _sharegpt_turns(items: Any, base: str) -> list[_Turn]:
    return _turn_list(items, base, "from", "value", _SHAREGPT_ROLES)


def _openai_turns(items: Any, base: str) -> list[_Turn]:
    return _turn_list(items, base, "role", "content", _MESSAGE_ROLES)


def _system_turn(rec: dict[str, Any]) -> list[_Turn]:
    text = opt_str(rec, "system")
    return [_Turn("system", text, "system", "system")] if text.strip() else []


def _prompt_turns(rec: dict[str, Any]) -> list[_Turn]:
    """A record's `prompt` field (a string: one user turn; or a message list), after its optional system prompt."""
    raw = rec["prompt"]
    if isinstance(raw, str):
        return _system_turn(rec) + [_Turn("user", raw, "prompt", "prompt")]
    if isinstance(raw, list):
        return _system_turn(rec) + _openai_turns(raw, "prompt")
    raise wrong_type("prompt", "a string or an array of messages", raw)


def _check_turns(turns: list[_Turn], *, prev_role: Role | None = None, allow_system: bool = True) -> None:
    """Roles in order, no empty turns, tool results only after a call. `prev_role` continues a prompt."""
    calls = False  # whether a tool result may follow
    for i, turn in enumerate(turns):
        if turn.role == "system":
            if not allow_system or i > 0 or prev_role is not None:
                raise Invalid("misplaced_system", turn.role_field, "a system prompt may only be the first turn")
        elif turn.role == "tool":
            if not calls:
                raise Invalid("orphan_tool_result", turn.role_field, "a tool result with no tool call before it")
        elif turn.role == prev_role and not (turn.role == "assistant" and turn.has_calls):
            raise Invalid(f"consecutive_{turn.role}", turn.role_field, f"two {turn.role} turns in a row")
        elif not turn.content.strip() and not turn.has_calls:
            raise Invalid("empty_reply" if turn.role == "assistant" else "empty_message", turn.content_field)
        if turn.role != "assistant" and any(m in turn.content for m in REASONING_MARKERS):
            raise Invalid(
                "reasoning_marker", turn.content_field,
                f"a {turn.role} message contains <think>/</think>; reasoning belongs in an assistant reply",
            )
        calls = turn.has_calls or (calls and turn.role == "tool")
        prev_role = turn.role


def _to_messages(turns: list[_Turn], tools: list[dict[str, Any]] | None = None) -> list[Message]:
    # Empty system prompts were accepted by _check_turns and are dropped here.
    messages = [
        {"role": t.role, "content": t.content, **t.extra}  # type: ignore[typeddict-item]
        for t in turns
        if t.role != "system" or t.content.strip()
    ]
    return Conversation(messages, tools=tools) if tools else messages


def _finish_chat(turns: list[_Turn], tools: list[dict[str, Any]] | None = None) -> list[Message]:
    _check_turns(turns)
    if not any(t.role == "assistant" for t in turns):
        raise Invalid("no_assistant")
    if not any(t.role == "assistant" and t.extra.get("weight", 1) for t in turns):
        raise Invalid("no_target", None, "every assistant turn has weight 0")
    return _to_messages(turns, tools)


def _parse_alpaca(rec: dict[str, Any]) -> list[Message]:
    unused(rec, ("instruction", "input", "output", "system", "history"))
    instruction = req_str(rec, "instruction")
    extra = opt_str(rec, "input")
    output = req_str(rec, "output")
    turns = _system_turn(rec)
    history = rec.get("history")
    if history is not None:
        if not isinstance(history, list):
            raise wrong_type("history", "array of [user, assistant] pairs", history)
        for i, pair in enumerate(history):
            base = f"history[{i}]"
            if not (isinstance(pair, list) and len(pair) == 2):
                raise wrong_type(base, "a [user, assistant] pair", pair)
            for j, (role, text) in enumerate(zip(("user", "assistant"), pair)):
                if not isinstance(text, str):
                    raise wrong_type(f"{base}[{j}]", "string", text)
                turns.append(_Turn(role, text, base, f"{base}[{j}]"))  # type: ignore[arg-type]
    prompt = "\n".join(part for part in (instruction, extra) if part.strip())
    turns.append(_Turn("user", prompt, "instruction", "instruction"))
    turns.append(_Turn("assistant", output, "output", "output"))
    return _finish_chat(turns)


def _parse_sharegpt(rec: dict[str, Any]) -> list[Message]:
    unused(rec, ("conversations", "system", "tools"))
    turns = _system_turn(rec) + _sharegpt_turns(req_list(rec, "conversations"), "conversations")
    return _finish_chat(turns, read_tools(rec))


def _parse_messages(rec: dict[str, Any]) -> list[Message]:
    # A top-level `system` is honoured here too rather than silently ignored.
    unused(rec, ("messages", "system", "tools"))
    turns = _system_turn(rec) + _openai_turns(req_list(rec, "messages"), "messages")
    return _finish_chat(turns, read_tools(rec))


# The key that marks each chat format, and its parser.
_MARKERS = {"alpaca": "instruction", "sharegpt": "conversations", "messages": "messages"}
_PARSERS: dict[str, Callable[[dict[str, Any]], list[Message]]] = {
    "alpaca": _parse_alpaca,
    "sharegpt": _parse_sharegpt,
    "messages": _parse_messages,
}


def _formats_of(rec: dict[str, Any]) -> list[str]:
    return [name for name, key in _MARKERS.items() if key in rec]


def read_chat(
    path: str | os.PathLike[str], *, format: str = "auto", on_error: str = "raise"
) -> tuple[list[list[Message]], LoadReport]:
    """Read alpaca / sharegpt / messages conversations from `.jsonl`, `.json`, `.parquet` or a
    `datasets.save_to_disk` folder.

    `format="auto"` takes the format from the first object record that has
    exactly one format's key (`instruction`, `conversations`, `messages`);
    later records of another format are errors (`format_mismatch`).
    """
    _check_policy(on_error)
    if format != "auto" and format not in CHAT_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {CHAT_FORMATS}, got {format!r}")
    path = Path(path)
    col = _Collector(path, on_error)
    chosen: list[str | None] = [None if format == "auto" else format]

    def parse(value: Any) -> list[Message]:
        rec = as_object(value)
        if "chosen" in rec and "rejected" in rec:
            raise Invalid("format_mismatch", None, "a preference record; read it with read_preference")
        found = _formats_of(rec)
        fmt = chosen[0]
        if fmt is None:
            if len(found) != 1:
                reason = "ambiguous_format" if found else "unknown_format"
                detail = (
                    f"keys for {' and '.join(found)}"
                    if found
                    else f"no key of a known chat format ({', '.join(_MARKERS.values())})"
                )
                raise Invalid(reason, None, detail)
            fmt = chosen[0] = col.report.format = found[0]
        if fmt not in found:
            if found:
                raise Invalid("format_mismatch", None, f"a {found[0]} record in a {fmt} file")
            raise Invalid("missing_field", _MARKERS[fmt])
        return _PARSERS[fmt](rec)

    if format != "auto":
        col.report.format = format
    col.run(_records(path), parse)
    return col.finish()


# --------------------------------------------------------------------------- preference


def _completion(rec: dict[str, Any], key: str, sharegpt: bool) -> list[_Turn]:
    if key not in rec:
        raise Invalid("missing_field", key)
    value = rec[key]
    if isinstance(value, str):
        turns = [_Turn("assistant", value, key, key)]
    elif isinstance(value, dict):  # a single message object
        turn = _sharegpt_turns([value], key)[0] if sharegpt else _openai_turns([value], key)[0]
        # Re-blame on `chosen.value`, not `chosen[0].value`: the source had no list.
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        turns = [_Turn(turn.role, turn.content, f"{key}.{role_key}", f"{key}.{content_key}", turn.extra)]
    elif isinstance(value, list):
        turns = _sharegpt_turns(value, key) if sharegpt else _openai_turns(value, key)
    else:
        raise wrong_type(key, "a string, a message object or an array of messages", value)
    if not turns:
        raise Invalid("empty_reply", key, "no messages")
    for end in (turns[0], turns[-1]):
        if end.role != "assistant":
            raise Invalid("wrong_role", end.role_field, f"{key} must start and end with an assistant turn")
    _check_turns(turns, prev_role="user", allow_system=False)
    return turns


def _split_full_pair(rec: dict[str, Any]) -> PreferencePair:
    """LLaMA-Factory v1's `chosen_messages`/`rejected_messages`: two whole conversations; the prompt is
    the turns they share, each side the rest (starting and ending with an assistant turn)."""
    unused(rec, ("chosen_messages", "rejected_messages", "system", "tools"))
    sides = {key: _system_turn(rec) + _openai_turns(req_list(rec, key), key) for key in ("chosen_messages", "rejected_messages")}
    chosen, rejected = sides["chosen_messages"], sides["rejected_messages"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and (chosen[shared].role, chosen[shared].content, chosen[shared].extra) == (
        rejected[shared].role, rejected[shared].content, rejected[shared].extra
    ):
        shared += 1
    prompt = chosen[:shared]
    _check_turns(prompt)
    if not prompt or prompt[-1].role != "user":
        raise Invalid("prompt_not_user", prompt[-1].role_field if prompt else "chosen_messages",
                      "the turns both sides share must end with a user turn")
    out = {}
    for side, turns in (("chosen", chosen[shared:]), ("rejected", rejected[shared:])):
        if not turns:
            raise Invalid("identical_pair", f"{side}_messages")
        for end in (turns[0], turns[-1]):
            if end.role != "assistant":
                raise Invalid("wrong_role", end.role_field, f"{side}_messages must go on and end with an assistant turn")
        _check_turns(turns, prev_role="user", allow_system=False)
        out[side] = _to_messages(turns)
    return {"prompt": _to_messages(prompt, read_tools(rec)), "chosen": out["chosen"], "rejected": out["rejected"]}


def _parse_preference(value: Any) -> PreferencePair:
    rec = as_object(value)
    if "chosen_messages" in rec:
        return _split_full_pair(rec)
    unused(rec, ("conversations", "prompt", "chosen", "rejected", "system", "tools"))
    if "conversations" in rec:
        sharegpt = True
        prompt = _system_turn(rec) + _sharegpt_turns(req_list(rec, "conversations"), "conversations")
    elif "prompt" in rec:
        sharegpt = False
        prompt = _prompt_turns(rec)
    else:
        raise Invalid("missing_field", "prompt", "expected 'conversations' (sharegpt) or 'prompt'")
    _check_turns(prompt)
    if not prompt or prompt[-1].role != "user":
        field = prompt[-1].role_field if prompt else ("conversations" if sharegpt else "prompt")
        raise Invalid("prompt_not_user", field)
    chosen = _to_messages(_completion(rec, "chosen", sharegpt))
    rejected = _to_messages(_completion(rec, "rejected", sharegpt))
    if chosen == rejected:
        raise Invalid("identical_pair", "rejected")
    return {"prompt": _to_messages(prompt, read_tools(rec)), "chosen": chosen, "rejected": rejected}


def read_preference(
    path: str | os.PathLike[str], *, on_error: str = "raise"
) -> tuple[list[PreferencePair], LoadReport]:
    """Read preference pairs from `.jsonl`, `.json`, `.parquet` or a `datasets.save_to_disk` folder.

    Three shapes, chosen per record: LLaMA-Factory v1's `chosen_messages` +
    `rejected_messages` (whole conversations; the turns they share are the
    prompt), sharegpt (`conversations` + `chosen` +
    `rejected`, each a `{"from", "value"}` object or a list of them, optional
    top-level `system`) or `prompt`/`chosen`/`rejected` given as strings
    (prompt -> one user turn, chosen/rejected -> one assistant turn) or as
    role/content message lists.
    """
    _check_policy(on_error)
    path = Path(path)
    col = _Collector(path, on_error)
    col.run(_records(path), _parse_preference)
    items, report = col.finish()
    return items, report


# --------------------------------------------------------------------------- text


def read_text(
    path: str | os.PathLike[str], *, mode: str = "line", field: str = "text", on_error: str = "raise"
) -> tuple[list[str], LoadReport]:
    """Read text documents into a list; see `iter_text` for the rules."""
    stream = iter_text(path, mode=mode, field=field, on_error=on_error)
    return list(stream), stream.report


class TextStream:
    """Documents of one text file, read lazily; `report` is complete once iterated.

    Iterating to the end raises `empty_dataset` when no document was kept.
    """

    def __init__(self, path: Path, mode: str, field: str, on_error: str) -> None:
        _check_policy(on_error)
        if mode not in ("line", "file"):
            raise ValueError(f"mode must be 'line' or 'file', got {mode!r}")
        suffix = path.suffix.lower()
        self.records = suffix in (".jsonl", ".json") or columnar.is_columnar(path)  # else plain text
        if self.records and mode != "line":
            raise ValueError("mode='file' applies to plain .txt files only")
        if not self.records and suffix != ".txt":
            raise DataFormatError(
                path, None, None, "unsupported_extension",
                f"expected .txt, .jsonl, .json, .parquet or a datasets.save_to_disk folder, got {path.suffix!r}",
            )
        self.path, self.mode, self.field = path, mode, field
        self._collector = _Collector(path, on_error)
        self.report = self._collector.report
        self.report.format = "text"

    def __iter__(self) -> Iterator[str]:
        col, path = self._collector, self.path
        if self.records:
            field = self.field

            def parse(value: Any) -> str:
                text = req_str(as_object(value), field)
                if not text.strip():
                    raise Invalid("empty_text", field)
                return text

            yield from col.stream(_records(path), parse)
        elif self.mode == "file":
            text = _whole_text(path)
            if text.strip():
                col.report.kept += 1
                yield text
        else:
            lines = ((n, "line", line) for n, line in _lines(path))
            yield from col.stream((r for r in lines if not isinstance(r[2], str) or r[2].strip()), lambda s: s)
        col.check_not_empty()


def iter_text(
    path: str | os.PathLike[str], *, mode: str = "line", field: str = "text", on_error: str = "raise"
) -> TextStream:
    """Text documents, one at a time.

    `.txt`: `mode="line"` gives one document per non-empty line (whitespace-only
    lines are separators, not errors); `mode="file"` gives the whole file as one
    document. `.jsonl`/`.json`/`.parquet`/a `save_to_disk` folder: one document
    per record, from the string field (column) `field`; `mode` must stay "line"
    there. Documents are returned verbatim (line endings removed in line mode).
    `.txt`, `.jsonl` and the columnar sources are streamed.
    """
    return TextStream(Path(path), mode, field, on_error)


# --------------------------------------------------------------------------- prompts


def prompt_record(messages: list[Message], task: str | None = None) -> PromptRecord:
    """A conversation as a prompt: everything before its final assistant turn, whose content is the answer
    (a conversation that ends on a user turn is all prompt, with no answer)."""
    tools = tools_of(messages)
    if messages and messages[-1]["role"] == "assistant":
        prompt = Conversation(messages[:-1], tools=tools) if tools else list(messages[:-1])
        return PromptRecord(messages=prompt, answer=messages[-1]["content"], task=task, text=None)
    return PromptRecord(messages=Conversation(messages, tools=tools) if tools else list(messages), answer=None,
                        task=task, text=None)


def _prompt_messages(turns: list[_Turn], field: str, tools: list[dict[str, Any]] | None = None) -> list[Message]:
    """A prompt: ends with a user turn, or with tool results (the model answers them next)."""
    _check_turns(turns)
    if not turns or turns[-1].role not in ("user", "tool"):
        raise Invalid("prompt_not_user", turns[-1].role_field if turns else field)
    return _to_messages(turns, tools)


def _plain_text(rec: dict[str, Any]) -> str | None:
    prompt = rec["prompt"]
    return prompt if isinstance(prompt, str) and not _system_turn(rec) else None


def _parse_prompt_record(value: Any) -> PromptRecord:
    if not isinstance(value, dict):
        raise wrong_type(None, "an object", value)
    rec = value
    if "prompt" not in rec:
        raise Invalid("missing_field", "prompt")
    unused(rec, ("prompt", "answer", "task", "system", "tools"))
    messages = _prompt_messages(_prompt_turns(rec), "prompt", read_tools(rec))
    answer = req_str(rec, "answer") if "answer" in rec else None
    task = req_str(rec, "task") if "task" in rec else None
    return PromptRecord(messages=messages, answer=answer, task=task, text=_plain_text(rec))


def _parse_prompt_line(value: Any) -> PromptRecord:
    """A `lines` row: `messages` (a trailing assistant turn is the answer) or a `prompt` string."""
    if isinstance(value, dict) and isinstance(value.get("messages"), list):
        turns = _openai_turns(value["messages"], "messages")
        answer = None
        if turns and turns[-1].role == "assistant":
            answer = turns.pop().content
        return PromptRecord(messages=_prompt_messages(turns, "messages"), answer=answer, task=None, text=None)
    if isinstance(value, dict) and isinstance(value.get("prompt"), str):
        return PromptRecord(messages=_prompt_messages(_prompt_turns(value), "prompt"), answer=None, task=None,
                            text=_plain_text(value))
    raise Invalid("no_prompt")


def _prompt_lines(path: Path) -> Iterator[_Raw]:
    """`lines`: `.jsonl` rows are records, any other file's non-empty lines are user prompts."""
    if path.suffix.lower() == ".jsonl" or columnar.is_columnar(path):
        yield from _records(path)
        return
    for number, line in _lines(path):
        if not isinstance(line, str):
            yield number, "line", line
        elif line.strip():
            yield number, "line", {"prompt": line}


def _first_record_has_prompt(path: Path) -> bool:
    for _, _, value in _records(path):
        return isinstance(value, dict) and "prompt" in value
    return False


def read_prompts(
    path: str | os.PathLike[str], *, format: str = "auto", on_error: str = "raise"
) -> tuple[list[PromptRecord], LoadReport]:
    """Prompts (`PromptRecord`s, each ending with a user turn) from one file.

    `format`: `prompt` (`{"prompt", "answer"}` records: `prompt` a string or a
    message list, optional `answer`, `system`, `task`); a chat format
    (`read_chat`'s conversations, each cut before its final assistant turn,
    whose content becomes the answer); `auto` (`prompt` when the first record
    has a `prompt` field, else the chat formats' own detection); or `lines`
    (one prompt per line: a `.jsonl` or columnar row with `messages` or a `prompt` string,
    any other file's non-empty line as a user message).
    """
    _check_policy(on_error)
    if format not in PROMPT_FORMATS:
        raise ValueError(f"format must be one of {PROMPT_FORMATS}, got {format!r}")
    path = Path(path)
    if format == "auto":
        format = "prompt" if _first_record_has_prompt(path) else "auto"
    if format not in ("prompt", "lines"):
        conversations, report = read_chat(path, format=format, on_error=on_error)
        return [prompt_record(c) for c in conversations], report
    col = _Collector(path, on_error)
    if format == "prompt":
        col.run(_records(path), _parse_prompt_record)
    else:
        col.run(_prompt_lines(path), _parse_prompt_line)
    col.report.format = format
    return col.finish()


# --------------------------------------------------------------------------- KTO (unpaired)


class KTOExample(TypedDict):
    prompt: list[Message]  # ends with a user turn
    completion: list[Message]  # starts and ends with an assistant turn
    label: bool  # desirable (True) or undesirable (False)


def _parse_kto(value: Any) -> list[KTOExample]:
    rec = as_object(value)
    if "completion" not in rec:  # a preference pair: one desirable and one undesirable example (TRL's unpair)
        pair = _parse_preference(rec)
        return [{"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
                for side in ("chosen", "rejected")]
    if "prompt" not in rec:
        raise Invalid("missing_field", "prompt")
    unused(rec, ("prompt", "completion", "label", "system", "tools"))
    label = rec.get("label")
    if not isinstance(label, bool):
        raise wrong_type("label", "true or false", label) if "label" in rec else Invalid("missing_field", "label")
    prompt = _prompt_turns(rec)
    _check_turns(prompt)
    if not prompt or prompt[-1].role != "user":
        raise Invalid("prompt_not_user", prompt[-1].role_field if prompt else "prompt")
    return [{"prompt": _to_messages(prompt), "completion": _to_messages(_completion(rec, "completion", False)),
             "label": label}]


def read_kto(path: str | os.PathLike[str], *, on_error: str = "raise") -> tuple[list[KTOExample], LoadReport]:
    """Read KTO examples from `.jsonl`, `.json`, `.parquet` or a `save_to_disk` folder.

    Records are `{"prompt", "completion", "label": true|false}` (prompt and completion as strings or
    role/content message lists, as TRL takes them), or preference pairs (any shape `read_preference`
    reads), each unpaired into a desirable (chosen) and an undesirable (rejected) example. Errors name
    the file, the record's line and the field.
    """
    _check_policy(on_error)
    path = Path(path)
    col = _Collector(path, on_error)
    col.run(_records(path), _parse_kto)
    records, report = col.finish()
    return [example for examples in records for example in examples], report
