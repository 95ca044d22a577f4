"""What a user can get wrong, told in one line instead of a traceback.

Design choices:
- `UserError` is the one type for mistakes a user can fix (bad data, a bad
  option value, a missing file, a bad checkpoint). `llmstages.cli.main`
  prints it as `llmstages: <command>: <where>: <why>` and exits 2; anything
  else is a bug and keeps its traceback. `LLMSTAGES_DEBUG=1` shows the
  traceback of a user error too.
- The errors other layers already raise with a precise message
  (`data.formats.DataFormatError`, `checkpointing.CheckpointError`,
  `checkpointing.RunFolderError`) count as user errors without those layers
  importing this module: `is_user_error` looks their classes up by name, and
  only in modules already imported (an error of a module never imported
  cannot have been raised), so this module imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_USER_ERROR = 2
DEBUG_VARIABLE = "LLMSTAGES_DEBUG"

# module -> class names whose instances are user errors
KNOWN_USER_ERRORS: dict[str, tuple[str, ...]] = {
    "llmstages.data.formats": ("DataFormatError",),
    "llmstages.checkpointing": ("CheckpointError", "RunFolderError"),
    "llmstages.model.checkpoint": ("CheckpointError",),  # where the checkpoint reader is moving
    "llmstages.data.shards.index": ("ShardError",),
    "llmstages.data.loader": ("ResumeMismatch",),
}


class UserError(Exception):
    """A mistake the user can fix; the message says where (file, line, field, option) and why."""


def _is_user_error_type(error: BaseException) -> bool:
    if isinstance(error, UserError):
        return True
    for module_name, names in KNOWN_USER_ERRORS.items():
        module = sys.modules.get(module_name)
        if module is not None and isinstance(error, tuple(getattr(module, n) for n in names if hasattr(module, n))):
            return True
    return False


def find_user_error(error: BaseException) -> BaseException | None:
    """`error` if it is a user error, else the user error it wraps (jsonargparse wraps what a class's
    `__init__` raises in its own ValueError, with the original as the cause); None for a bug."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if _is_user_error_type(current):
            return current
        seen.add(id(current))
        current = current.__cause__  # not __context__: a bug raised while handling a user error stays a bug
    return None


def is_user_error(error: BaseException) -> bool:
    return find_user_error(error) is not None


def debug() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0")


def report(command: str, error: BaseException) -> int:
    """Print a user error as one line on stderr (with its traceback under LLMSTAGES_DEBUG=1); the exit code."""
    if debug():
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    text = str(error).strip() or type(error).__name__
    where = f"llmstages: {command}: " if command else "llmstages: "
    print(where + text.replace("\n", "\n  "), file=sys.stderr)
    return EXIT_USER_ERROR


@contextmanager
def as_user_error(*types: type[BaseException]) -> Iterator[None]:
    """Within the block, an error of `types` (what a tool's own checks raise on bad input) becomes a `UserError`."""
    try:
        yield
    except types as error:
        raise UserError(str(error)) from error
