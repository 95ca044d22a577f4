"""bf16-mixed vs float32: where a bf16 train step's time goes on this CPU.

The llmstages train step of `benchmarks.throughput` (forward + chunked loss +
backward + AdamW, float32 master weights and optimiser state) at the 25M
shape, run as `precision: 32-true` and as `bf16-mixed` (CPU autocast to
bfloat16: matmuls and SDPA in bf16; RMSNorm, log-softmax and the loss
reductions in float32, as the model and `losses` write them). Both start
from the same weights; they alternate round by round (one torch thread,
process CPU time). In the same alternation a 1024 x 1024 matmul in each
dtype gives the machine's own bf16 / float32 matmul ratio, the most a step
can gain. Then `torch.profiler` on one step of each: self CPU time by part
of the model (as in `throughput.md`) and by operator.

    python -m benchmarks.bf16            # 25M shape
    python -m benchmarks.bf16 --quick    # the quick shape, smoke run into a temp folder
"""

from __future__ import annotations

import contextlib
import statistics

import torch

from benchmarks.common import Report, alternate, base_parser, med_range, output_dir, paired_ratios, set_threads
from benchmarks.throughput import (SHAPES, Candidate, build_ours, make_batches, matmul_candidate, ours_loss,
                                   profile_breakdown, runner)

from llmstages.losses import DEFAULT_CHUNK_SIZE

PRECISIONS = {"float32": contextlib.nullcontext,
              "bf16-mixed": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}

# operator families of the per-operator profile
OP_KINDS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention kernel (SDPA)", ("scaled_dot_product",)),
    ("copies and dtype casts", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("exp / log (softmax, loss)", ("aten::exp", "aten::log", "aten::amax", "aten::logsumexp")),
)


def op_kind(name: str) -> str:
    for kind, prefixes in OP_KINDS:
        if any(name.startswith(p) or p in name for p in prefixes):
            return kind
    return "other (elementwise, norms, optimiser, ...)"


def op_profile(candidate: Candidate, batch) -> dict[str, float]:
    """Self CPU ms of one step by operator family (after a warm-up step)."""
    candidate.step(batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        candidate.step(batch)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        kind = op_kind(event.key)
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1000.0
    return totals


def main() -> None:
    parser = base_parser(__doc__, default_repeats=5)
    parser.set_defaults(threads=1)
    parser.add_argument("--shape", default=None, choices=list(SHAPES), help="model shape (default 25m; quick with --quick)")
    args = parser.parse_args()
    set_threads(args)
    shape_name = args.shape or ("quick" if args.quick else "25m")
    if args.quick:
        args.repeats = min(args.repeats, 2)
    out = output_dir(args)
    report = Report("bf16", "bf16-mixed vs float32: the train step on this CPU", args)
    shape = SHAPES[shape_name]
    batches = make_batches(shape, "cpu")
    candidates = {p: Candidate(p, build_ours(shape.config(), "cpu", False), ours_loss(DEFAULT_CHUNK_SIZE), "foreach", ctx)
                  for p, ctx in PRECISIONS.items()}
    first = {}
    for p, c in candidates.items():
        with torch.no_grad(), c.autocast():
            first[p] = float(c.loss_fn(c.model, *batches[0]))
    timed = {p: runner(c, batches, 1) for p, c in candidates.items()}
    timed["matmul float32"], flops = matmul_candidate("cpu", torch.float32, 1024)
    timed["matmul bf16"], _ = matmul_candidate("cpu", torch.bfloat16, 1024)
    tokens = float(shape.batch * shape.seq)
    work = {"float32": tokens, "bf16-mixed": tokens, "matmul float32": flops, "matmul bf16": flops}
    samples = alternate(timed, repeats=args.repeats, warmup=args.warmup, work=work, clock="cpu")
    step_ratio = paired_ratios(samples["bf16-mixed"], samples["float32"])
    matmul_ratio = paired_ratios(samples["matmul bf16"], samples["matmul float32"])

    parts = {p: profile_breakdown(c.model, c.loss_fn, c.optimizer, lambda: batches[0], c.autocast)
             for p, c in candidates.items()}
    ops = {p: op_profile(c, batches[1]) for p, c in candidates.items()}

    cfg = shape.config()
    report.text(
        f"Shape `{shape_name}`: vocab {shape.vocab}, d_model {shape.d_model}, {shape.n_layer} layers, "
        f"{shape.n_head} heads, d_mlp {candidates['float32'].model.config.d_mlp}, seq {shape.seq}, batch "
        f"{shape.batch} ({cfg.n_layer} blocks, tied embeddings); llmstages loss chunk {DEFAULT_CHUNK_SIZE}; AdamW foreach, "
        "float32 parameters and state in both. One torch thread, process CPU time, candidates alternated "
        "(the starting one rotates), ratios per round, median (min–max). 4 other engineers share this "
        "machine's 2 cores: compare the within-run ratios, not absolute times."
    )
    report.text("## Speed-up of bf16-mixed over float32")
    report.table(["what", "bf16 / float32 rate, median (min–max)"], [
        ["train step (tokens/s)", med_range(step_ratio, "{:.2f}")],
        ["1024 × 1024 matmul (FLOP/s): the ceiling", med_range(matmul_ratio, "{:.2f}")],
    ])
    report.table(["candidate", "rate median (min–max)", "loss at start"], [
        ["float32 step, tokens/s", med_range(samples["float32"].rates(), "{:,.0f}"), f"{first['float32']:.5f}"],
        ["bf16-mixed step, tokens/s", med_range(samples["bf16-mixed"].rates(), "{:,.0f}"), f"{first['bf16-mixed']:.5f}"],
        ["matmul float32, GFLOP/s", med_range([r / 1e9 for r in samples["matmul float32"].rates()], "{:.1f}"), ""],
        ["matmul bf16, GFLOP/s", med_range([r / 1e9 for r in samples["matmul bf16"].rates()], "{:.1f}"), ""],
    ])
    for title, table in (("part of the model (backward attributed to its forward)", parts), ("operator family", ops)):
        report.text(
            f"## Profile of one step by {title}\n\n`torch.profiler` self CPU time, wall-clock based (the load "
            "inflates totals: compare shares)."
        )
        keys = list(dict.fromkeys(k for p in table for k in table[p]))
        totals = {p: sum(table[p].values()) for p in table}
        report.table(["part", *(f"{p} ms (share)" for p in table)], [
            [k, *(f"{table[p].get(k, 0.0):,.0f} ({table[p].get(k, 0.0) / totals[p]:.0%})" for p in table)]
            for k in keys
        ])
    print(f"bf16/float32 step {statistics.median(step_ratio):.2f}x, matmul {statistics.median(matmul_ratio):.2f}x")
    report.write(out)


if __name__ == "__main__":
    main()
