"""The `llmstages` command: LightningCLI's `fit`/`validate`, and the tool commands beside them.

`llmstages fit --config configs/sft.yaml` is `llmstages.trainer_cli` (Lightning's
own LightningCLI, imported only for fit/validate). Every other command is a module of `llmstages.tools` with a
one-line `HELP` and a `main(argv)`, listed once, in `TOOLS`, which is also what
`llmstages --help` prints.
"""

from __future__ import annotations

import importlib
import sys

TRAINING = {
    "fit": "train a stage: llmstages fit --config configs/<stage>.yaml [--config fragment.yaml] [--key value ...]",
    "validate": "evaluate a checkpoint: llmstages validate --config configs/<stage>.yaml --ckpt_path CKPT",
}
TOOLS = {  # command -> module under llmstages.tools
    "generate": "generate",
    "chat": "chat",
    "export": "export",
    "import": "hf_import",
    "tokenizer": "tokenizer",
    "masks": "show_masks",
    "demo": "demo",
}


def _tool(name: str):
    return importlib.import_module(f"llmstages.tools.{TOOLS[name]}")


def usage() -> str:
    lines = ["usage: llmstages COMMAND [options]   (llmstages COMMAND --help for a command's options)", "", "commands:"]
    width = max(map(len, [*TRAINING, *TOOLS]))
    lines += [f"  {name:<{width}}  {text}" for name, text in TRAINING.items()]
    lines += [f"  {name:<{width}}  {_tool(name).HELP}" for name in TOOLS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    given = argv is not None
    argv = list(argv if given else sys.argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] in TOOLS:
        _tool(argv[0]).main(argv[1:])
        return
    if argv[0] not in TRAINING and not argv[0].startswith("-"):
        raise SystemExit(f"llmstages: unknown command {argv[0]!r}\n\n{usage()}")
    from llmstages.trainer_cli import lightning_cli  # Lightning only for fit/validate: the tools start faster

    lightning_cli(argv if given else None)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
