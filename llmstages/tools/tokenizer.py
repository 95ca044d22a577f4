"""`llmstages tokenizer train`: a byte-level BPE tokenizer from text files."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmstages.tools import TOOLS

HELP = TOOLS["tokenizer"].help


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="llmstages tokenizer", description=HELP)
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
