"""Data preparation: MB of text per second through our pipeline vs raw `tokenizers`.

Pretraining corpora (../shared/data: tinyshakespeare, LLaMA-Factory's
wiki_demo.txt and c4_demo.jsonl; the embedded corpus written to a file when
absent), tokenised with a real BPE (minimind's tokenizer.json, the
embedded default tokenizer when absent).

- ours: `PretrainData.token_cache()` + `setup()` into an empty cache folder:
  content hashing, streaming `iter_text`, `Tokenizer.encode_batch` in chunks
  (the backend's `encode_batch_fast`: the same ids without character
  offsets), EOS appended, the memory-mapped token file and its rows
  (packing `documents`).
- raw: `tokenizers.Tokenizer.encode_batch` on the same documents, already in
  memory, in one call: the baseline the target names (it also computes the
  offsets nothing here reads).

Both use every core (the Rust backend's thread pool). Rounds alternate;
the ratio ours / raw is per round (target ≥ 0.8). Wall clock, since the
point is parallel speed; the CPU-time ratio is given too, because the cores
are shared with other sessions and wall-clock rounds are noisy there.
An SFT row (chat template + best-fit packing of alpaca_en_demo, one
conversation at a time) is given as context, without a target.

    python -m benchmarks.data_prep            # ~3 min
    python -m benchmarks.data_prep --quick    # < 1 min
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from benchmarks.common import SHARED_DATA, Report, alternate, base_parser, med_range, output_dir, paired_ratios, set_threads

from llmstages.data import synthetic
from llmstages.data.formats import iter_text
from llmstages.data import PretrainData, SFTData
from llmstages.data.tokenizer import Tokenizer

CORPORA = ("tinyshakespeare/input.txt", "llamafactory/wiki_demo.txt", "llamafactory/c4_demo.jsonl")


class Timed:
    """A candidate that also records its own process CPU time per call."""

    def __init__(self, fn) -> None:
        self.fn, self.cpu = fn, []

    def __call__(self) -> None:
        start = time.process_time()
        self.fn()
        self.cpu.append(time.process_time() - start)


def ours(path: Path, tokenizer_spec: str | None, scratch: Path):
    def run():
        cache = Path(tempfile.mkdtemp(dir=scratch))
        try:
            data = PretrainData(files=[str(path)], tokenizer=tokenizer_spec, cache_dir=str(cache), seq_len=256,
                                packing="documents")
            data.setup("fit")
        finally:
            shutil.rmtree(cache)
    return run


def raw(path: Path, tokenizer: Tokenizer):
    documents = list(iter_text(path))
    backend = tokenizer.backend

    def run():
        backend.encode_batch(documents, add_special_tokens=False)
    return run


def sft(path: Path, tokenizer_spec: str | None, scratch: Path):
    def run():
        data = SFTData(files=[str(path)], tokenizer=tokenizer_spec, cache_dir=str(scratch), seq_len=1024,
                       packing="documents", val_fraction=0.0)
        data.setup("fit")
    return run


def main() -> None:
    parser = base_parser(__doc__, default_repeats=7)
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    args = parser.parse_args()
    set_threads(args)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    out = output_dir(args)
    report = Report("data_prep", "Data preparation: our pipeline vs raw `tokenizers` encode_batch", args)

    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        corpora = [args.data / c for c in CORPORA if (args.data / c).is_file()]
        tokenizer_dir = args.data / "minimind"
        if corpora and (tokenizer_dir / "tokenizer.json").is_file():
            tokenizer_spec, tokenizer_name = str(tokenizer_dir), f"minimind ({tokenizer_dir})"
        else:
            tokenizer_spec, tokenizer_name = None, "the embedded default tokenizer"
        if not corpora:
            embedded = scratch / "embedded.txt"
            embedded.write_text("\n".join(synthetic.pretrain_corpus()) + "\n")
            corpora = [embedded]
        if args.quick:
            corpora = corpora[:1]
        tokenizer = Tokenizer.from_file(tokenizer_spec) if tokenizer_spec else None
        if tokenizer is None:
            probe = PretrainData(files=[str(corpora[0])], cache_dir=str(scratch / "probe"))
            tokenizer = probe.tokenizer

        rows = []
        for path in corpora:
            megabytes = path.stat().st_size / 1e6
            candidates = {"ours": Timed(ours(path, tokenizer_spec, scratch)), "raw": Timed(raw(path, tokenizer))}
            samples = alternate(candidates, repeats=args.repeats, warmup=args.warmup, work=megabytes)
            warm = args.warmup
            cpu_ratio = [r / o for o, r in zip(candidates["ours"].cpu[warm:], candidates["raw"].cpu[warm:])]
            wall = paired_ratios(samples["ours"], samples["raw"])
            median = statistics.median(wall)
            rows.append([
                path.name, f"{megabytes:.2f}", med_range(samples["ours"].rates(), "{:.2f}"),
                med_range(samples["raw"].rates(), "{:.2f}"), med_range(wall, "{:.2f}"), med_range(cpu_ratio, "{:.2f}"),
                "met" if median >= 0.8 else f"missed by {(1 - median / 0.8) * 100:.0f}%",
            ])
        sft_row = None
        alpaca = args.data / "llamafactory" / "alpaca_en_demo.json"
        if alpaca.is_file() and not args.quick:
            sft_run = sft(alpaca, tokenizer_spec, scratch / "sft")
            sft_run()  # builds the cache folder's state once
            start = time.perf_counter()
            sft_run()
            seconds = time.perf_counter() - start
            sft_row = f"{alpaca.stat().st_size / 1e6 / seconds:.2f} MB/s of JSON ({seconds:.1f} s for {alpaca.name})"

    report.text(
        f"Tokenizer: {tokenizer_name}, vocab {tokenizer.vocab_size}. {os.cpu_count()} cores; "
        f"TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}. MB = 10^6 bytes of the file on disk."
    )
    report.text("## Ratio (MB/s, ours over raw encode_batch; target ≥ 0.8)")
    report.table(["corpus", "MB", "ours MB/s", "raw MB/s", "ours / raw (wall clock)", "raw / ours CPU time", "verdict"],
                 rows)
    report.text(
        "Values are median (min–max) over the rounds. What ours adds: hashing the file for the cache key, "
        "reading it line by line, chunking 1024 documents per `encode_batch`, converting ids to a NumPy "
        "array per document and writing the memory map; rows are cut lazily (`_TokenRows`)."
    )
    if sft_row:
        report.text(
            "## SFT preparation (context, no target)\n\n`SFTData.setup` on alpaca_en_demo.json: read, chat template "
            f"and mask per conversation (one `encode` call per segment, not batched), truncation, best-fit "
            f"packing into rows of 1024: {sft_row}."
        )
    report.write(out)


if __name__ == "__main__":
    main()
