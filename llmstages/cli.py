"""The `llmstages` command.

`llmstages fit|validate|test --config configs/sft.yaml` is Lightning's own
`LightningCLI`: every stage's and data module's typed `__init__` signature is
its CLI and its YAML schema; the data's tokenizer size is linked into the
model's `vocab_size`. A few tool commands sit beside it:

- `llmstages tokenizer train --files ... --vocab-size 8192 --out DIR`
- `llmstages masks --config CONFIG [-n 3] [--html FILE]`: see which tokens train
- `llmstages export --ckpt CKPT --out DIR`: a Hugging Face folder from a checkpoint
- `llmstages demo`: the four stages, end to end, on the embedded data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from llmstages.data.modules import StageData
from llmstages.loggers import LoggedConfig
from llmstages.stages.base import StageModule

TOOLS = ("tokenizer", "masks", "demo")
# command -> module with `HELP` and `main(argv)`
TOOL_MODULES = {
    "generate": "llmstages.tools.generate",
    "chat": "llmstages.tools.chat",
    "export": "llmstages.tools.export",
    "import": "llmstages.tools.hf_import",
}


class StagesCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")


def lightning_cli(args: list[str] | None = None, run: bool = True) -> StagesCLI:
    return StagesCLI(
        StageModule,
        StageData,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggedConfig,
        args=args,
        run=run,
    )


def _tokenizer_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="llmstages tokenizer", description="train a byte-level BPE tokenizer")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train")
    train.add_argument("--files", nargs="+", required=True, help="text files, one or more")
    train.add_argument("--vocab-size", type=int, default=8192)
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--out", required=True, help="folder for tokenizer.json and tokenizer_config.json")
    args = parser.parse_args(argv)
    from llmstages.data.tokenizer import Tokenizer

    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    tokenizer = Tokenizer.train_from_files(args.files, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    path = tokenizer.save(args.out)
    print(f"saved a {tokenizer.vocab_size}-token tokenizer to {path}")


def _masks_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="llmstages masks", description="show which tokens carry a loss")
    parser.add_argument("--config", required=True, help="a stage config with a `data:` section")
    parser.add_argument("-n", type=int, default=3, help="how many rows to show")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--html", help="also write the rows to this HTML file")
    args = parser.parse_args(argv)
    from llmstages.masks import show_masks

    show_masks(args.config, n=args.n, split=args.split, html=args.html)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOL_MODULES:
        import importlib

        importlib.import_module(TOOL_MODULES[argv[0]]).main(argv[1:])
        return
    if argv and argv[0] in TOOLS:
        command, rest = argv[0], argv[1:]
        if command == "tokenizer":
            _tokenizer_command(rest)
        elif command == "masks":
            _masks_command(rest)
        else:
            from llmstages.demo import main as demo_main

            demo_main(rest)
        return
    lightning_cli(argv)


if __name__ == "__main__":
    main()
