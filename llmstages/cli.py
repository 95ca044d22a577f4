"""The `llmstages` command: LightningCLI's `fit`/`validate`, and the tool commands beside them.

`llmstages fit --config configs/sft.yaml` is `llmstages.trainer_cli` (Lightning's
own LightningCLI, imported only for fit/validate). Every other command is a module of `llmstages.tools` with a
`main(argv)`, listed once, in `llmstages.tools.TOOLS`, with the one-line help `llmstages --help` prints.

Design choices:
- `llmstages --help` imports no tool module (the help lines live here), and
  each tool builds its parser before importing torch or Lightning, so help is
  instant (tested by looking at `sys.modules` in a subprocess).
- A user error (`llmstages.errors.is_user_error`) anywhere below, tools and
  LightningCLI alike, ends the command with one line on stderr and exit code
  2; other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import importlib
import sys

from llmstages.tools import TOOLS

TRAINING = {
    "fit": "train a stage: llmstages fit --config configs/<stage>.yaml [--config fragment.yaml] [--key value ...]",
    "validate": "evaluate a checkpoint: llmstages validate --config configs/<stage>.yaml --ckpt_path CKPT",
}


def _tool(name: str):
    return importlib.import_module(f"llmstages.tools.{TOOLS[name].module}")


def usage() -> str:
    lines = ["usage: llmstages COMMAND [options]   (llmstages COMMAND --help for a command's options)", "", "commands:"]
    width = max(map(len, [*TRAINING, *TOOLS]))
    lines += [f"  {name:<{width}}  {text}" for name, text in TRAINING.items()]
    lines += [f"  {name:<{width}}  {TOOLS[name].help}" for name in TOOLS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    given = argv is not None
    argv = list(argv if given else sys.argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in TOOLS and argv[0] not in TRAINING and not argv[0].startswith("-"):
        print(f"llmstages: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    command = argv[0] if not argv[0].startswith("-") else ""
    try:
        if argv[0] in TOOLS:
            _tool(argv[0]).main(argv[1:])
            return
        from llmstages.trainer_cli import lightning_cli  # Lightning only for fit/validate: the tools start faster

        lightning_cli(argv if given else None)  # None: LightningCLI reads sys.argv itself
    except Exception as error:
        from llmstages.errors import find_user_error, report

        cause = find_user_error(error)
        if cause is None:
            raise
        raise SystemExit(report(command, cause)) from None


if __name__ == "__main__":
    main()
