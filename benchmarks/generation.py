"""Generation throughput with and without the KV cache.

A random model of the `demo` preset's shape (the context widened to fit the
prompt and the new tokens) generates exactly `--new-tokens` tokens per row
(no stop id) from random prompts, at batch size 1 and 8. Per repeat the
cached and uncached runs alternate (A/B, then B/A on the next repeat), after
one warm-up of each, so drifting load on a shared machine hits both alike.
Reported: new tokens per second (rows x new tokens / wall time), median and
min-max over the repeats, and the ratio of the medians. Cached and uncached
outputs are checked to be identical on every run (greedy).

    python -m benchmarks.generation            # 256 new tokens, 5 repeats (~7 minutes on 2 shared cores)
    python -m benchmarks.generation --quick    # 64 new tokens, 3 repeats, batch 1 and 8 (< 2 minutes)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import command_line, cpu_model, git_commit, load_average, output_dir

from llmstages.model import ModelConfig, Transformer
from llmstages.model.generate import generate_batch


def _timed(model, prompts, new_tokens: int, use_cache: bool) -> tuple[float, list]:
    start = time.perf_counter()
    out = generate_batch(model, prompts, new_tokens, use_cache=use_cache)
    return time.perf_counter() - start, out


def run(args: argparse.Namespace) -> str:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_name(args.preset, max_seq_len=args.prompt_len + args.new_tokens)
    model = Transformer(config).eval()
    results = []
    began = time.perf_counter()
    for batch in args.batch_sizes:
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len)).tolist()
        warm = min(8, args.new_tokens)
        for use_cache in (True, False):
            _timed(model, prompts, warm, use_cache)
        times: dict[bool, list[float]] = {True: [], False: []}
        for repeat in range(args.repeats):
            order = (True, False) if repeat % 2 == 0 else (False, True)
            outputs = {}
            for use_cache in order:
                seconds, outputs[use_cache] = _timed(model, prompts, args.new_tokens, use_cache)
                times[use_cache].append(seconds)
            if outputs[True] != outputs[False]:
                raise RuntimeError(f"cached and uncached generation differ at batch {batch}")
            print(f"batch {batch} repeat {repeat}: cache {times[True][-1]:.2f}s, no cache {times[False][-1]:.2f}s",
                  flush=True)
        tokens = batch * args.new_tokens
        row = {"batch": batch}
        for use_cache, label in ((True, "cache"), (False, "no_cache")):
            rates = [tokens / t for t in times[use_cache]]
            row[label] = (statistics.median(rates), min(rates), max(rates))
        row["speedup"] = row["cache"][0] / row["no_cache"][0]
        results.append(row)
    wall = time.perf_counter() - began

    lines = [
        "# Generation throughput: KV cache vs. recomputing the sequence",
        "",
        f"Command: `{command_line()}`",
        "",
        f"- model: `{args.preset}` preset shape, random weights, {model.num_parameters():,} parameters, "
        f"max_seq_len {config.max_seq_len}",
        f"- prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per row (no stop), greedy; "
        f"{args.repeats} repeats after a warm-up, cached/uncached alternating",
        "- cached and uncached outputs were identical token for token on every run",
        f"- torch {torch.__version__}, Python {platform.python_version()}, commit {git_commit()}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; load average "
        f"{load_average()} (a shared machine: other work ran beside it)",
        f"- wall time {wall:.0f} s",
        "",
        "| batch | with cache, tokens/s: median (min-max) | without cache, tokens/s: median (min-max) | speedup (medians) |",
        "|---:|---:|---:|---:|",
    ]
    for row in results:
        c, n = row["cache"], row["no_cache"]
        lines.append(f"| {row['batch']} | {c[0]:.0f} ({c[1]:.0f}-{c[2]:.0f}) | {n[0]:.0f} ({n[1]:.0f}-{n[2]:.0f}) "
                     f"| {row['speedup']:.1f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 new tokens, 3 repeats (under 2 minutes)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default: benchmarks/results; a temporary folder with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = 64, 3
    report = run(args)
    path = output_dir(args) / "generation.md"
    path.write_text(report)
    print(report)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
