"""`llmstages data prepare`: tokenise text inputs once into token shards for `StreamingPretrainData`."""

from __future__ import annotations

import argparse

from llmstages.tools import TOOLS

HELP = TOOLS["data"].help


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="llmstages data", description=HELP)
    sub = parser.add_subparsers(dest="action", required=True)
    prepare = sub.add_parser("prepare", help="text inputs -> token shards + index.json (resumable; rerun to continue)")
    prepare.add_argument("--files", nargs="+", required=True,
                         help=".txt, .jsonl/.json or .parquet files, or datasets.save_to_disk folders (a `text` field)")
    prepare.add_argument("--out", required=True, help="the shard folder (new or empty; a killed run's to continue it)")
    prepare.add_argument("--tokenizer", default=None, help="tokenizer.json or its folder (default: the embedded one)")
    prepare.add_argument("--text-mode", choices=["line", "file"], default="line",
                         help="for .txt: a document per line (default) or per file")
    prepare.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                         help="a bad record: stop naming file, line and field (default), or count it and go on")
    prepare.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard (default 2^25)")
    prepare.add_argument("--workers", type=int, default=None, help="encoding processes (default: one per CPU)")
    prepare.add_argument("--cache-dir", default=".cache/llmstages", help="where the embedded default tokenizer lives")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from llmstages.data.base import load_tokenizer
    from llmstages.data.shards import prepare_shards
    from llmstages.data.shards.index import INDEX
    from llmstages.data.shards.prepare import DEFAULT_SHARD_TOKENS
    from llmstages.errors import as_user_error

    tokenizer = load_tokenizer(args.tokenizer, args.cache_dir)
    with as_user_error(FileNotFoundError):  # ShardError already is a UserError
        out = prepare_shards(args.files, tokenizer, args.out, text_mode=args.text_mode, on_error=args.on_error,
                             shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, workers=args.workers,
                             progress=not args.no_progress)
    import json

    index = json.loads((out / INDEX).read_text())
    skipped = sum(index["skipped"].values())
    print(f"{out}: {index['tokens']:,} tokens, {index['documents']:,} documents in {len(index['shards'])} shards"
          + (f" ({skipped} records skipped: {index['skipped']})" if skipped else ""))
