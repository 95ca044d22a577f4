"""What a user can get wrong, told in one line instead of a traceback.

Design choices:
- `UserError` is the one base type for mistakes a user can fix (bad data, a
  bad option value, a missing file, a bad checkpoint). `llmstages.cli.main`
  prints it as `llmstages: <command>: <where>: <why>` and exits 2; anything
  else is a bug and keeps its traceback. `LLMSTAGES_DEBUG=1` shows the
  traceback of a user error too.
- This module is the bottom layer and imports nothing of llmstages, so every
  layer's precise error subclasses it where it is raised
  (`data.formats.DataFormatError`, `model.checkpoint.CheckpointError`,
  `run_plan.RunFolderError`, `ConfigError` for an option value that cannot
  work): whether an error is the user's is its type, not a list kept here.
- Those subclasses also keep their builtin base (`ValueError`,
  `RuntimeError`), so code catching the builtin keeps working.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_USER_ERROR = 2
DEBUG_VARIABLE = "LLMSTAGES_DEBUG"


class UserError(Exception):
    """A mistake the user can fix; the message says where (file, line, field, option) and why."""


class ConfigError(UserError, ValueError):
    """An option value (a stage's hyperparameter, a named variant) that cannot work; the message names the option."""


def find_user_error(error: BaseException) -> BaseException | None:
    """`error` if it is a user error, else the user error it wraps (jsonargparse wraps what a class's
    `__init__` raises in its own ValueError, with the original as the cause); None for a bug."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
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
