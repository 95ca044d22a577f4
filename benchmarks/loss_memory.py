"""Loss memory: chunked target log-probs vs full float32 logits + `F.cross_entropy`.

For each vocabulary size, the same hidden states `[1, T, D]`, output weight
`[V, D]` and labels go through
- chunked: `llmstages.losses.token_logps` (default `recompute=True`, as the
  stages use it) + `reduce_token_loss`;
- full: `hidden @ weight.T` in float32, then `F.cross_entropy` on the shifted labels;
then backward. Reported: peak memory of loss + backward above the inputs
(the weight gradient included: both need it), the agreement of loss and
gradients, and the time of loss + backward, alternated.

Peak memory is the process's resident-set high-water mark (`VmHWM`, reset
through `/proc/self/clear_refs`) in a fresh subprocess per measurement, with
glibc told to return every large block to the system, so it counts what
was really resident (Linux only). The time cost of chunking is also given
relative to a whole train step of a backbone of this vocabulary at T (full
runs only): the issue's bound is ≤ 10% of step time.

    python -m benchmarks.loss_memory           # vocab 32k and 128k, T 2048, ~10 min on 2 cores
    python -m benchmarks.loss_memory --quick   # vocab 8k, T 512, < 1 min
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, Report, alternate, base_parser, med_range, output_dir, paired_ratios, set_threads

from llmstages.losses import IGNORE_INDEX, reduce_token_loss, token_logps
from llmstages.model.config import ModelConfig
from llmstages.model.transformer import Transformer

METHODS = ("chunked", "chunked recompute=False", "full")


def inputs(vocab: int, length: int, dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(1, length, dim, generator=generator)).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=generator) * dim**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (1, length), generator=generator)
    labels[0, : length // 8] = IGNORE_INDEX  # a prompt: not every position is a target
    return hidden, weight, labels


def loss_of(method: str, hidden, weight, labels, chunk_size: int):
    if method.startswith("chunked"):
        logps = token_logps(hidden, weight, labels, chunk_size=chunk_size, recompute=method == "chunked")
        return reduce_token_loss(-logps, labels)
    logits = hidden @ weight.t()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def loss_and_backward(method: str, hidden, weight, labels, chunk_size: int) -> float:
    hidden.grad = weight.grad = None
    loss = loss_of(method, hidden, weight, labels, chunk_size)
    loss.backward()
    return float(loss.detach())


# --------------------------------------------------------------------------- peak memory (child process)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(method: str, vocab: int, length: int, dim: int, chunk_size: int) -> None:
    torch.set_num_threads(1)
    hidden, weight, labels = inputs(vocab, length, dim)
    loss_and_backward(method, hidden, weight, labels, chunk_size)  # warm-up: code paths, allocator
    hidden.grad = weight.grad = None
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    loss_and_backward(method, hidden, weight, labels, chunk_size)
    print(json.dumps({"peak": _status("VmHWM") - before}))


def peak_bytes(method: str, vocab: int, length: int, dim: int, chunk_size: int) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.loss_memory", "--_child", method, str(vocab), str(length), str(dim), str(chunk_size)],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {method} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak"]


# --------------------------------------------------------------------------- main


def agreement(vocab: int, length: int, dim: int, chunk_size: int) -> dict[str, float]:
    """Largest differences between chunked and full: loss (absolute), gradients (relative to the largest entry)."""
    hidden, weight, labels = inputs(vocab, length, dim)
    out = {}
    full_loss = loss_and_backward("full", hidden, weight, labels, chunk_size)
    full = (hidden.grad.clone(), weight.grad.clone())
    for method in METHODS[:2]:
        loss = loss_and_backward(method, hidden, weight, labels, chunk_size)
        diffs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip((hidden.grad, weight.grad), full)]
        out[method] = {"loss": abs(loss - full_loss), "grad": max(diffs)}
    return out


def step_overhead(vocab: int, length: int, chunk_size: int, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Train-step time with each loss on a d 512, 8-layer backbone of this vocabulary (batch 1, T `length`)."""
    config = ModelConfig(vocab_size=vocab, d_model=512, n_layer=8, n_head=8, max_seq_len=length)
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    _, _, labels = inputs(vocab, length, 8)
    input_ids = labels.clamp(min=0)

    def step(method: str):
        def run():
            if method.startswith("chunked"):
                head = lambda h, w: token_logps(h, w, labels, chunk_size=chunk_size, recompute=method == "chunked")  # noqa: E731
                loss = reduce_token_loss(-model(input_ids, head=head), labels)
            else:
                logits = model(input_ids)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    samples = alternate({m: step(m) for m in METHODS}, repeats=repeats, warmup=warmup, clock="cpu")
    return {m: samples[m].seconds for m in METHODS}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        method, vocab, length, dim, chunk = sys.argv[2], *map(int, sys.argv[3:7])
        child(method, vocab, length, dim, chunk)
        return
    parser = base_parser(__doc__, default_repeats=5)
    parser.set_defaults(threads=1)
    parser.add_argument("--vocab", type=int, nargs="+", default=None, help="vocabulary sizes (default 32000 128256)")
    parser.add_argument("--length", type=int, default=None, help="tokens T (default 2048)")
    parser.add_argument("--dim", type=int, default=512, help="hidden size D")
    parser.add_argument("--chunk-size", type=int, default=1024, help="token_logps chunk size (StageModule's default)")
    parser.add_argument("--step-repeats", type=int, default=3, help="rounds of the train-step overhead measurement")
    args = parser.parse_args()
    set_threads(args)
    if not Path("/proc/self/clear_refs").exists():
        parser.error("peak memory needs Linux's /proc/self/clear_refs")
    vocabs = args.vocab or ([8192] if args.quick else [32000, 128256])
    length = args.length or (512 if args.quick else 2048)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    out = output_dir(args)
    report = Report("loss_memory", "Loss memory: chunked log-probs vs full float32 logits + cross-entropy", args)

    memory_rows, time_rows, agree_rows, step_rows = [], [], [], []
    for vocab in vocabs:
        peaks = {m: peak_bytes(m, vocab, length, args.dim, args.chunk_size) for m in METHODS}
        logits_mb = length * vocab * 4 / 2**20
        for method in METHODS:
            ratio = peaks["full"] / peaks[method]
            verdict = "" if method == "full" else ("met" if ratio >= 4 else f"missed ({ratio:.2f}× < 4×)")
            memory_rows.append([vocab, method, f"{peaks[method] / 2**20:,.0f}", f"{ratio:.2f}×", verdict])
        agree = agreement(vocab, length, args.dim, args.chunk_size)
        for method, diff in agree.items():
            ok = "met" if diff["loss"] <= 1e-5 and diff["grad"] <= 1e-5 else "missed"
            agree_rows.append([vocab, method, f"{diff['loss']:.1e}", f"{diff['grad']:.1e}", ok])
        hidden, weight, labels = inputs(vocab, length, args.dim)
        repeats = args.repeats if vocab <= 32768 else min(args.repeats, 3)
        samples = alternate(
            {m: (lambda m=m: loss_and_backward(m, hidden, weight, labels, args.chunk_size)) for m in METHODS},
            repeats=repeats, warmup=args.warmup, clock="cpu",
        )
        for method in METHODS:
            time_rows.append([vocab, method, med_range([s * 1000 for s in samples[method].seconds], "{:,.0f}"),
                              med_range(paired_ratios(samples[method], samples["full"], rate=False), "{:.2f}"), repeats])
        del hidden, weight, labels, samples
        if not args.quick and vocab <= 32768:
            steps = step_overhead(vocab, length, args.chunk_size, args.step_repeats, args.warmup)
            full = statistics.median(steps["full"])
            for method in METHODS:
                extra = [(a - b) / b * 100 for a, b in zip(steps[method], steps["full"])]
                verdict = "" if method == "full" else ("met" if statistics.median(extra) <= 10 else "missed")
                step_rows.append([vocab, method, med_range(steps[method], "{:.2f}"), med_range(extra, "{:+.1f}"), verdict])
            del full
        report_lines = f"vocab {vocab}: full logits alone are {logits_mb:,.0f} MiB"
        print(report_lines, flush=True)

    report.text(
        f"T = {length} tokens, batch 1, D = {args.dim}, float32; labels: the first T/8 positions are a prompt "
        f"(no target), the rest targets. Chunk size {args.chunk_size}. One torch thread, process CPU time for timings "
        "(the cores are shared with other sessions)."
    )
    report.text("## Peak memory of loss + backward (above the inputs; target: chunked ≥ 4× less than full)")
    report.table(["vocab", "method", "peak MiB", "full / this", "verdict"], memory_rows)
    report.text(
        "`full` holds the float32 logits, cross-entropy's log-softmax and the logits' gradient; `chunked` holds one "
        "`[chunk, V]` buffer at a time plus the weight gradient both need; `recompute=False` also keeps the "
        "`[targets, V]` softmax for backward (the opt-in trade of memory for time)."
    )
    report.text("## Agreement with the full path (target: loss and gradients to 1e-5)")
    report.table(["vocab", "method", "|loss difference|", "max gradient difference / max gradient", "verdict"], agree_rows)
    report.text("## Time of loss + backward")
    report.table(["vocab", "method", "ms median (min–max)", "time / full, per round", "rounds"], time_rows)
    if step_rows:
        report.text(
            "## Cost in a whole train step (target: chunking ≤ 10% of step time)\n\n"
            f"Backbone d 512, 8 layers, 8 heads, T {length}, batch 1, AdamW; the three losses alternated."
        )
        report.table(["vocab", "method", "step s median (min–max)", "extra vs full, % per round", "verdict"], step_rows)
    report.write(out)


if __name__ == "__main__":
    main()
