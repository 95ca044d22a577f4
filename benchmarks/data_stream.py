"""Streamed pretraining data: shard preparation speed, loader headroom, and memory against corpus size.

1. Preparation: `llmstages data prepare` (`prepare_shards`, 2 worker processes) on the shared
   pretraining corpora (tinyshakespeare, LLaMA-Factory's wiki_demo.txt and c4_demo.jsonl; the
   embedded corpus when absent) with minimind's BPE, against raw `tokenizers` `encode_batch` on
   the same documents already in memory (the Rust thread pool on the same cores). Tokens/s,
   wall clock (both are parallel), rounds alternated; target ours / raw >= 0.8.
2. Loader headroom: `StreamingPretrainData`'s training loader (batch 4 x 512, shuffle window
   1024 rows, `documents` packing) against what one training step of the 25M shape
   (benchmarks.throughput's `25m`: vocab 32000, d_model 512, 8 layers, batch 4 x 512) consumes,
   tokens/s each, rounds alternated; target loader / step >= 20.
3. Memory: peak RSS of a fresh process streaming 2,000 batches from a generated 1 GB and a
   4 GB shard folder (random ids, EOS every ~300 tokens, written under a temporary folder
   and deleted); target: equal within 10% and under 1 GB.

    python -m benchmarks.data_stream            # ~10 min on 2 shared cores
    python -m benchmarks.data_stream --quick    # < 2 min (small corpora, 50 MB vs 200 MB)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from benchmarks.common import ROOT, SHARED_DATA, Report, alternate, base_parser, med_range, output_dir, paired_ratios

CORPORA = ("tinyshakespeare/input.txt", "llamafactory/wiki_demo.txt", "llamafactory/c4_demo.jsonl")
SEQ, BATCH = 512, 4  # the 25M shape's step: 2048 tokens
RSS_BATCHES = 2000


def prep_candidates(files: list[Path], tokenizer, scratch: Path):
    from llmstages.data.formats import iter_text
    from llmstages.data.shards import prepare_shards

    docs = [d for f in files for d in iter_text(f)]
    counter = {"n": 0}

    def ours():
        counter["n"] += 1
        out = scratch / f"prep-{counter['n']}"
        prepare_shards(files, tokenizer, out, workers=2, progress=False)
        shutil.rmtree(out)

    def raw():
        tokenizer.backend.encode_batch(docs, add_special_tokens=False)

    tokens = sum(len(e.ids) + 1 for e in tokenizer.backend.encode_batch(docs, add_special_tokens=False))
    return {"ours (data prepare, 2 workers)": ours, "raw encode_batch": raw}, tokens, len(docs)


def loader_candidates(folder: Path, tokenizer_spec: str | None, cache: Path, batches: int):
    import torch

    from benchmarks.throughput import OPTIMISER, SHAPES
    from llmstages.data import StreamingPretrainData
    from llmstages.model.transformer import Transformer

    data = StreamingPretrainData(sources=str(folder), tokenizer=tokenizer_spec, seq_len=SEQ, batch_size=BATCH,
                                 shuffle_buffer=1024, val_fraction=0.0, cache_dir=str(cache))
    data.setup("fit")
    loader = data.train_dataloader()
    state = {"iterator": iter(loader)}

    def load():
        full = 0
        while full < batches:  # full batches only: an epoch's last one may be shorter
            try:
                batch = next(state["iterator"])
            except StopIteration:
                state["iterator"] = iter(loader)
                continue
            loader.mark_consumed()
            full += batch["input_ids"].shape == (BATCH, SEQ)

    shape = SHAPES["25m"]
    model = Transformer(shape.config())
    optimizer = torch.optim.AdamW(model.parameters(), **OPTIMISER)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq))

    def step():
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"loader": load, "25M training step": step}


def generate_shards(folder: Path, gigabytes: float, tokenizer) -> None:
    """A shard folder of random ids (uint16) with EOS every ~300 tokens, as `data prepare` would lay it out."""
    import numpy as np

    from llmstages.data.shards.index import FORMAT, INDEX, VERSION, shard_name, tokenizer_fingerprint
    from llmstages.data.shards.prepare import DEFAULT_SHARD_TOKENS

    folder.mkdir(parents=True)
    total = int(gigabytes * 1e9) // 2
    rng = np.random.default_rng(0)
    shards, written = [], 0
    while written < total:
        n = min(DEFAULT_SHARD_TOKENS, total - written)
        tokens = rng.integers(0, tokenizer.vocab_size - 1, n, dtype=np.uint16)
        tokens[tokens >= tokenizer.eos_id] += 1  # any id but EOS, then EOS where documents end
        tokens[rng.integers(0, n, n // 300)] = tokenizer.eos_id
        tokens.tofile(folder / shard_name(len(shards)))
        shards.append({"file": shard_name(len(shards)), "tokens": n, "documents": int((tokens == tokenizer.eos_id).sum())})
        written += n
    index = {"format": FORMAT, "version": VERSION, "key": f"generated-{gigabytes}GB",
             "tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": tokenizer.vocab_size,
             "eos_id": tokenizer.eos_id, "dtype": "uint16", "documents_end_with": "eos", "shards": shards,
             "tokens": written, "documents": sum(s["documents"] for s in shards)}
    (folder / INDEX).write_text(json.dumps(index))


def rss_child(folder: str, cache: str, batches: int) -> None:
    """Stream `batches` training batches from `folder`; print the peak RSS (bytes) as JSON."""
    def high_water() -> int:  # this process's peak RSS (VmHWM: ru_maxrss would carry the parent's over exec)
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024

    from llmstages.data import StreamingPretrainData

    data = StreamingPretrainData(sources=folder, seq_len=SEQ, batch_size=BATCH, shuffle_buffer=1024,
                                 val_fraction=0.0, cache_dir=cache)
    data.setup("fit")
    loader = data.train_dataloader()
    before = high_water()
    taken = 0
    while taken < batches:
        for _ in loader:
            loader.mark_consumed()
            taken += 1
            if taken == batches:
                break
        loader.sampler.set_epoch(loader.sampler.epoch + 1)
    peak = high_water()
    print(json.dumps({"peak": peak, "after_setup": before, "read": data.train_set.sets[0].bytes_read,
                      "tokens": data.train_set.sets[0].index["tokens"]}))


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0], default_repeats=5)
    parser.add_argument("--data", type=Path, default=SHARED_DATA, help="the shared data folder")
    parser.add_argument("--rss-child", nargs=3, metavar=("FOLDER", "CACHE", "BATCHES"), help=argparse_hidden())
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1], int(args.rss_child[2]))
        return
    if args.quick:
        args.repeats = min(args.repeats, 2)
    out = output_dir(args)
    report = Report("data_stream", "Streamed pretraining data: preparation, loader headroom, memory", args)
    from llmstages.data.base import default_tokenizer
    from llmstages.data.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="llmstages-data-stream-") as scratch_dir:
        scratch = Path(scratch_dir)
        files = [args.data / c for c in CORPORA if (args.data / c).is_file()]
        tokenizer_dir = args.data / "minimind"
        tokenizer_spec = str(tokenizer_dir) if (tokenizer_dir / "tokenizer.json").is_file() and files else None
        if not files:
            from llmstages.data import synthetic

            files = [scratch / "embedded.txt"]
            files[0].write_text("\n".join(synthetic.pretrain_corpus()) + "\n")
        if args.quick:
            files = files[:1]
        cache = scratch / "cache"
        tokenizer = Tokenizer.from_file(tokenizer_spec) if tokenizer_spec else default_tokenizer(cache)
        megabytes = sum(f.stat().st_size for f in files) / 1e6

        # 1. preparation
        prep, tokens, n_docs = prep_candidates(files, tokenizer, scratch)
        samples = alternate(prep, repeats=args.repeats, warmup=args.warmup, work=tokens)
        names = list(prep)
        prep_ratio = paired_ratios(samples[names[0]], samples[names[1]])

        # 2. loader headroom (shards of the same corpus)
        from llmstages.data.shards import prepare_shards

        folder = prepare_shards(files, tokenizer, scratch / "shards", workers=2, progress=False)
        batches = 200 if not args.quick else 50
        loaders = loader_candidates(folder, tokenizer_spec, cache, batches)
        load_samples = alternate(loaders, repeats=args.repeats, warmup=1,
                                 work={"loader": batches * BATCH * SEQ, "25M training step": BATCH * SEQ})
        headroom = paired_ratios(load_samples["loader"], load_samples["25M training step"])

        # 3. peak RSS against corpus size, each in a fresh process
        sizes = (0.05, 0.2) if args.quick else (1.0, 4.0)
        default = default_tokenizer(cache)
        rss = {}
        for gigabytes in sizes:
            generated = scratch / f"generated-{gigabytes}GB"
            generate_shards(generated, gigabytes, default)
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.data_stream", "--rss-child", str(generated), str(cache),
                 str(RSS_BATCHES if not args.quick else 300)],
                cwd=ROOT, capture_output=True, text=True, timeout=1200, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if child.returncode != 0:
                raise RuntimeError(child.stderr[-3000:])
            rss[gigabytes] = json.loads(child.stdout.strip().splitlines()[-1])
            shutil.rmtree(generated)

    def verdict(value: float, target: float, higher: bool = True) -> str:
        ok = value >= target if higher else value <= target
        return "met" if ok else f"missed ({value:.2f} vs {target:g})"

    report.text(f"Corpora: {', '.join(f.name for f in files)} ({megabytes:.1f} MB, {n_docs:,} documents, "
                f"{tokens:,} tokens with EOS); tokenizer: {tokenizer_spec or 'the embedded default'} "
                f"(vocab {tokenizer.vocab_size}). {os.cpu_count()} cores, shared with other sessions: the ratios "
                "are per round (both candidates timed seconds apart), values are median (min–max).")
    report.text("## 1. Preparation (tokens/s, target ours / raw ≥ 0.8)")
    report.table(["candidate", "tokens/s"], [[n, med_range(samples[n].rates(), "{:,.0f}")] for n in names])
    median = statistics.median(prep_ratio)
    report.text(f"ours / raw: **{med_range(prep_ratio, '{:.2f}')}**, {verdict(median, 0.8)}. Ours includes hashing "
                "the inputs for the key, reading and validating every record, chunking, the EOS, and writing the "
                "shards atomically; raw is `encode_batch` on documents already in memory.")
    report.text("## 2. Loader headroom (tokens/s, target loader / 25M step ≥ 20)")
    report.table(["candidate", "tokens/s"], [[n, med_range(load_samples[n].rates(), "{:,.0f}")] for n in loaders])
    median = statistics.median(headroom)
    report.text(f"loader / step: **{med_range(headroom, '{:.0f}')}x**, {verdict(median, 20)}. The loader: "
                f"`StreamingPretrainData` batches of {BATCH} x {SEQ} (byte-range reads of a 1024-row shuffle window, "
                "`documents` packing) in this process; the step: forward, backward and AdamW of the 25M shape on "
                "every core.")
    report.text("## 3. Peak RSS streaming a generated corpus (target: equal within 10%, < 1 GB)")
    rows = [[f"{g:g} GB", f"{r['tokens']:,}", f"{r['after_setup'] / 1e6:,.0f} MB", f"{r['peak'] / 1e6:,.0f} MB",
             f"{r['read'] / 1e6:,.1f} MB"] for g, r in rss.items()]
    report.table(["corpus", "tokens", "RSS after setup", "peak RSS", "read from shards"], rows)
    small, large = (rss[g]["peak"] for g in sizes)
    ratio = large / small
    report.text(f"peak RSS {sizes[1]:g} GB / {sizes[0]:g} GB: **{ratio:.3f}**, "
                f"{'met' if abs(ratio - 1) <= 0.10 and large < 1e9 else 'missed'} (each a fresh process streaming "
                f"{RSS_BATCHES if not args.quick else 300} batches of {BATCH} x {SEQ}; most of the RSS is the "
                "interpreter, torch and Lightning).")
    report.write(out)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
