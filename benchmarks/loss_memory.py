"""Loss memory: chunked target log-probs vs full float32 logits + `F.cross_entropy`, swept over chunk sizes.

For each vocabulary size, the same hidden states `[1, T, D]`, output weight
`[V, D]` and labels go through
- chunked: `llmstages.losses.token_logps` (default `recompute=True`, as the
  stages use it) + `reduce_token_loss`, at every chunk size of the sweep;
- chunked recompute=False: the opt-in variant, at the default chunk size;
- full: `hidden @ weight.T` in float32, then `F.cross_entropy` on the shifted labels;
then backward. Reported: peak memory of loss + backward above the inputs
(the weight gradient included: both need it), the agreement of loss and
gradients, the time of loss + backward and of a whole train step, alternated,
and per chunk size a verdict against both targets (>= 4x less memory than
full at every vocabulary, <= 10% extra train-step time). The default chunk
size (`llmstages.losses.DEFAULT_CHUNK_SIZE`) was chosen from this table.

Peak memory is the process's resident-set high-water mark (`VmHWM`, reset
through `/proc/self/clear_refs`) in a fresh subprocess per measurement, with
glibc told to return every large block to the system, so it counts what
was really resident (Linux only). To keep a full run near 15 minutes of one
core's CPU time, the largest vocabulary (> 32768) is swept for memory and
agreement only; its loss + backward time is measured at the default chunk
size, and the train step only at the smaller vocabularies.

    python -m benchmarks.loss_memory           # vocab 32k and 128k, T 2048, chunks 256-2048: ~15 CPU minutes (43 min wall at load ~10)
    python -m benchmarks.loss_memory --quick   # vocab 8k, T 512, < 1 min
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, Report, alternate, base_parser, med_range, output_dir, paired_ratios, set_threads

from llmstages.losses import DEFAULT_CHUNK_SIZE, IGNORE_INDEX, reduce_token_loss, token_logps
from llmstages.model.config import ModelConfig
from llmstages.model.transformer import Transformer

METHODS = ("chunked", "chunked recompute=False", "full")
MEMORY_TARGET, TIME_TARGET = 4.0, 10.0  # full / chunked peak memory, at least; extra train-step time, % at most
SWEPT_TIME_VOCAB = 32768  # vocabularies up to this get every timing for every chunk size


@dataclass(frozen=True)
class Candidate:
    method: str  # one of METHODS
    chunk: int  # unused by `full`

    @property
    def name(self) -> str:
        return "full" if self.method == "full" else f"{self.method} @ {self.chunk}"

    @property
    def chunk_cell(self) -> str:
        return "" if self.method == "full" else str(self.chunk)


def candidates(chunk_sizes: list[int], default: int) -> list[Candidate]:
    """Every chunk size with recompute (as the stages run), recompute=False at the default, and full."""
    return ([Candidate("chunked", c) for c in chunk_sizes]
            + [Candidate("chunked recompute=False", default), Candidate("full", default)])


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


# --------------------------------------------------------------------------- measurements in this process


def agreement(vocab: int, length: int, dim: int, chunked: list[Candidate]) -> dict[Candidate, dict[str, float]]:
    """Largest differences between chunked and full: loss (absolute), gradients (relative to the largest entry)."""
    hidden, weight, labels = inputs(vocab, length, dim)
    out = {}
    full_loss = loss_and_backward("full", hidden, weight, labels, 1)
    full = (hidden.grad.clone(), weight.grad.clone())
    for candidate in chunked:
        loss = loss_and_backward(candidate.method, hidden, weight, labels, candidate.chunk)
        diffs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip((hidden.grad, weight.grad), full)]
        out[candidate] = {"loss": abs(loss - full_loss), "grad": max(diffs)}
    return out


def loss_times(vocab: int, length: int, dim: int, timed: list[Candidate], repeats: int, warmup: int):
    hidden, weight, labels = inputs(vocab, length, dim)
    return alternate(
        {c: (lambda c=c: loss_and_backward(c.method, hidden, weight, labels, c.chunk)) for c in timed},
        repeats=repeats, warmup=warmup, clock="cpu",
    )


def step_times(vocab: int, length: int, timed: list[Candidate], repeats: int, warmup: int) -> dict[Candidate, list[float]]:
    """Train-step time with each loss on a d 512, 8-layer backbone of this vocabulary (batch 1, T `length`)."""
    config = ModelConfig(vocab_size=vocab, d_model=512, n_layer=8, n_head=8, max_seq_len=length)
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    _, _, labels = inputs(vocab, length, 8)
    input_ids = labels.clamp(min=0)

    def step(candidate: Candidate):
        def run():
            if candidate.method.startswith("chunked"):
                head = lambda h, w: token_logps(h, w, labels, chunk_size=candidate.chunk,  # noqa: E731
                                                recompute=candidate.method == "chunked")
                loss = reduce_token_loss(-model(input_ids, head=head), labels)
            else:
                logits = model(input_ids)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    samples = alternate({c: step(c) for c in timed}, repeats=repeats, warmup=warmup, clock="cpu")
    return {c: samples[c].seconds for c in timed}


# --------------------------------------------------------------------------- main


def verdict_rows(chunk_sizes: list[int], default: int, memory_ratio: dict[tuple[int, Candidate], float],
                 step_extra: dict[tuple[int, Candidate], list[float]], vocabs: list[int]) -> list[list[object]]:
    rows = []
    for chunk in chunk_sizes:
        candidate = Candidate("chunked", chunk)
        ratios = [memory_ratio[(v, candidate)] for v in vocabs]
        extras = [statistics.median(step_extra[(v, candidate)]) for v in vocabs if (v, candidate) in step_extra]
        memory_ok = min(ratios) >= MEMORY_TARGET
        time_ok = bool(extras) and max(extras) <= TIME_TARGET
        time_cell = " / ".join(f"{e:+.1f}%" for e in extras) if extras else "not measured"
        verdict = "met" if memory_ok and time_ok else "missed: " + ", ".join(
            part for part, ok in (("memory", memory_ok), ("time", time_ok)) if not ok)
        rows.append([f"**{chunk}** (default)" if chunk == default else chunk,
                     " / ".join(f"{r:.2f}×" for r in ratios), time_cell, verdict])
    return rows


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
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=None,
                        help="token_logps chunk sizes to sweep (default 256 512 1024 2048; the default chunk is always included)")
    parser.add_argument("--step-repeats", type=int, default=5, help="rounds of the train-step measurement")
    args = parser.parse_args()
    set_threads(args)
    if not Path("/proc/self/clear_refs").exists():
        parser.error("peak memory needs Linux's /proc/self/clear_refs")
    vocabs = args.vocab or ([8192] if args.quick else [32000, 128256])
    length = args.length or (512 if args.quick else 2048)
    default = DEFAULT_CHUNK_SIZE
    chunk_sizes = sorted(set(args.chunk_sizes or ([128] if args.quick else [256, 512, 1024, 2048])) | {default})
    if args.quick:
        args.repeats, args.step_repeats = min(args.repeats, 3), min(args.step_repeats, 2)
    out = output_dir(args)
    report = Report("loss_memory", "Loss memory: chunked log-probs vs full float32 logits + cross-entropy", args)
    every = candidates(chunk_sizes, default)
    chunked = [c for c in every if c.method != "full"]
    at_default = [c for c in every if c.method == "full" or c.chunk == default]
    full = Candidate("full", default)

    memory_rows, agree_rows, time_rows, step_rows = [], [], [], []
    memory_ratio, step_extra = {}, {}
    for vocab in vocabs:
        peaks = {c: peak_bytes(c.method, vocab, length, args.dim, c.chunk) for c in every}
        for c in every:
            ratio = peaks[full] / peaks[c]
            memory_ratio[(vocab, c)] = ratio
            verdict = "" if c == full else ("met" if ratio >= MEMORY_TARGET else f"missed ({ratio:.2f}× < 4×)")
            memory_rows.append([vocab, c.method, c.chunk_cell, f"{peaks[c] / 2**20:,.0f}", f"{ratio:.2f}×", verdict])
        for c, diff in agreement(vocab, length, args.dim, chunked).items():
            ok = "met" if diff["loss"] <= 1e-5 and diff["grad"] <= 1e-5 else "missed"
            agree_rows.append([vocab, c.method, c.chunk, f"{diff['loss']:.1e}", f"{diff['grad']:.1e}", ok])
        swept = vocab <= SWEPT_TIME_VOCAB
        timed = every if swept else at_default
        repeats = args.repeats if swept else min(args.repeats, 3)
        samples = loss_times(vocab, length, args.dim, timed, repeats, args.warmup)
        for c in timed:
            time_rows.append([vocab, c.method, c.chunk_cell, med_range([s * 1000 for s in samples[c].seconds], "{:,.0f}"),
                              med_range(paired_ratios(samples[c], samples[full], rate=False), "{:.2f}"), repeats])
        del samples
        if swept:
            steps = step_times(vocab, length, every, args.step_repeats, args.warmup)
            for c in every:
                extra = [(a - b) / b * 100 for a, b in zip(steps[c], steps[full])]
                step_extra[(vocab, c)] = extra
                verdict = "" if c == full else ("met" if statistics.median(extra) <= TIME_TARGET else "missed")
                step_rows.append([vocab, c.method, c.chunk_cell, med_range(steps[c], "{:.2f}"), med_range(extra, "{:+.1f}"),
                                  verdict])
        print(f"vocab {vocab}: full logits alone are {length * vocab * 4 / 2**20:,.0f} MiB", flush=True)

    report.text(
        f"T = {length} tokens, batch 1, D = {args.dim}, float32; labels: the first T/8 positions are a prompt "
        f"(no target), the rest targets ({length - length // 8} targets). Chunk sizes {', '.join(map(str, chunk_sizes))}; "
        f"the default (`llmstages.losses.DEFAULT_CHUNK_SIZE`) is {default}. One torch thread, process CPU time for "
        "timings (the cores are shared with other sessions). Vocabularies above "
        f"{SWEPT_TIME_VOCAB} are swept for memory and agreement only (loss + backward timed at the default chunk, "
        "no train step), to keep the run near 15 CPU minutes."
    )
    report.text(f"## Verdict per chunk size (targets: ≥ {MEMORY_TARGET:g}× less memory than full at every vocabulary, "
                f"≤ {TIME_TARGET:g}% extra train-step time)")
    report.table(["chunk", "full / chunked memory (" + " / ".join(map(str, vocabs)) + ")",
                  "extra train-step time vs full, median", "verdict"],
                 verdict_rows(chunk_sizes, default, memory_ratio, step_extra, vocabs))
    report.text("## Peak memory of loss + backward (above the inputs; target: chunked ≥ 4× less than full)")
    report.table(["vocab", "method", "chunk", "peak MiB", "full / this", "verdict"], memory_rows)
    report.text(
        "`full` holds the float32 logits, cross-entropy's log-softmax and the logits' gradient; `chunked` holds one "
        "`[chunk, V]` buffer at a time plus the weight gradient both need; `recompute=False` also keeps the "
        "`[targets, V]` softmax for backward (the opt-in trade of memory for time)."
    )
    report.text("## Agreement with the full path (target: loss and gradients to 1e-5)")
    report.table(["vocab", "method", "chunk", "|loss difference|", "max gradient difference / max gradient", "verdict"],
                 agree_rows)
    report.text("## Time of loss + backward")
    report.table(["vocab", "method", "chunk", "ms median (min–max)", "time / full, per round", "rounds"], time_rows)
    if step_rows:
        report.text(
            f"## Cost in a whole train step (target: chunking ≤ {TIME_TARGET:g}% of step time)\n\n"
            f"Backbone d 512, 8 layers, 8 heads, T {length}, batch 1, AdamW; every loss alternated, "
            f"{args.step_repeats} rounds after {args.warmup} warm-up."
        )
        report.table(["vocab", "method", "chunk", "step s median (min–max)", "extra vs full, % per round", "verdict"],
                     step_rows)
    report.write(out)


if __name__ == "__main__":
    main()
