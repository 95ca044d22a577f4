"""The train step at the shape people fine-tune: Qwen2.5-0.5B, bf16-mixed, 2048-token packed rows (issue #25).

The shape is the `qwen2-0.5b` preset (hidden 896, 24 layers, 14 query / 2 KV
heads of 64, q/k/v biases, intermediate 4864, vocabulary 151,936, tied
embeddings, RoPE theta 1e6: Qwen2.5-0.5B's config.json, which
`configs/recipes/qwen2.5-0.5b.yaml` reads from the model folder). Rows are
what `SFTData(packing="documents")` makes of LLaMA-Factory's
`alpaca_en_demo.json` at `seq_len` 2048 (the default tokenizer: the lengths
of real examples, bin-packed; prompts unlabelled). Both candidates run bf16
autocast (float32 weights, gradients and AdamW state), activation
checkpointing per block, batch 1 x 2048:

- llmstages: `Transformer` with `activation_checkpointing`, the chunked
  `token_logps` head (chunk 1024, the stages' default) and
  `reduce_token_loss`; packed rows attend per document (`document_ids`).
- transformers: `Qwen2ForCausalLM` (SDPA) with `gradient_checkpointing_enable`
  (non-reentrant), `labels=`, and the rows' equivalent 4D block-diagonal mask
  and position ids.

To fit two 0.5B models with AdamW in this machine's memory next to other
sessions, the transformers model is built on the very same `Parameter`
objects as ours (the names differ, the tensors are one), and one AdamW
(for-loop, torch's CPU default) steps them: each candidate's step is the whole
forward + loss + backward + AdamW step, from the weights the previous step
left. Before any step both give the same loss on the first row (reported).
`--optimizer sgd` (plain SGD, no state) is for a machine whose free memory
cannot hold AdamW's 4 GB of state beside the step: the optimiser is the same
for both candidates either way, so the ratio is about forward + loss + backward.
The candidates and a 1024 x 1024 bf16 matmul (the rate MFU is stated against)
alternate round by round (one torch thread, process CPU time; `--budget-minutes`
stops starting rounds on a slow shared machine). Before timing, a same-weights
check and one warm-up step of each on a slice of row 1. Peak RSS of a
step: the process's high-water mark reset (`/proc/self/clear_refs`) before it
and read after it, so it includes the shared weights, gradients and AdamW state.

    python -m benchmarks.real_shape            # qwen2.5-0.5b, 3 rounds after 1 warm-up
    python -m benchmarks.real_shape --quick    # a tiny Qwen-like shape, smoke run into a temp folder
"""

from __future__ import annotations

import ctypes
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (SHARED_DATA, Report, Samples, alternate, base_parser, data_files, med_range,
                               output_dir, paired_ratios, set_threads)
from benchmarks.throughput import matmul_candidate

from llmstages.losses import reduce_token_loss, token_logps
from llmstages.model.config import ModelConfig
from llmstages.model.hf import config_to_hf, state_dict_to_hf
from llmstages.model.transformer import Transformer, document_mask

SHAPES = {
    "qwen2.5-0.5b": (ModelConfig.from_name("qwen2-0.5b"), 2048),
    "quick": (ModelConfig(vocab_size=2048, n_layer=2, n_head=4, n_kv_head=2, d_model=128, d_mlp=352,
                          max_seq_len=256, qkv_bias=True), 256),
}
CHUNK = 1024
TARGET = 1.2


def packed_rows(seq_len: int, count: int, cache: str) -> tuple[list[dict], str]:
    """The first `count` packed training rows of alpaca_en_demo at `seq_len`, and what the report calls them."""
    from llmstages.data import SFTData

    files, source = data_files(SHARED_DATA / "llamafactory" / "alpaca_en_demo.json", "the embedded conversations")
    data = SFTData(files=files, packing="documents", seq_len=seq_len, batch_size=1, val_fraction=0.0,
                   shuffle=False, cache_dir=cache, seed=0)
    data.setup("fit")
    rows = []
    for batch in data.train_dataloader():
        rows.append({k: batch[k] for k in ("input_ids", "labels", "position_ids", "document_ids")})
        if len(rows) == count:
            break
    return rows, source


def shared_hf_model(ours: Transformer):
    """A transformers model of `ours`' config whose parameters are `ours`' own `Parameter` objects."""
    import transformers

    hf_dict = config_to_hf(ours.config, architecture="qwen2")
    config = transformers.Qwen2Config(**{k: v for k, v in hf_dict.items() if k not in ("architectures", "model_type")})
    hf = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    by_storage = {p.data_ptr(): p for p in ours.parameters()}
    for name, tensor in state_dict_to_hf(ours.state_dict(), ours.config, architecture="qwen2").items():
        module_name, _, leaf = name.rpartition(".")
        setattr(hf.get_submodule(module_name), leaf, by_storage[tensor.data_ptr()])
    if ours.config.tie_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    if {id(p) for p in hf.parameters()} != {id(p) for p in ours.parameters()}:
        raise RuntimeError("the transformers model does not hold exactly our parameters")
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.train()
    return hf


def ours_loss(model: Transformer, row: dict) -> torch.Tensor:
    labels = row["labels"]
    head = lambda hidden, weight: token_logps(hidden, weight, labels, chunk_size=CHUNK)  # noqa: E731
    logps = model(row["input_ids"], position_ids=row["position_ids"], document_ids=row["document_ids"], head=head)
    return reduce_token_loss(-logps, labels, normalize="token", document_ids=row["document_ids"])


def hf_loss(model, row: dict) -> torch.Tensor:
    # our IGNORE_INDEX is transformers' -100; both shift labels the same way
    return model(input_ids=row["input_ids"], attention_mask=document_mask(row["document_ids"]),
                 position_ids=row["position_ids"], labels=row["labels"]).loss


def peak_rss_gb(run) -> float:
    """Run `run()`; the process's peak resident memory during it, GB (high-water mark reset first)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the reset starts from what is held
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    run()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def labelled_window(row: dict, length: int) -> dict:
    """The `length`-token slice of `row` (at a multiple of `length`) holding the most labelled tokens."""
    starts = range(0, row["labels"].shape[1] - length + 1, length)
    best = max(starts, key=lambda start: int((row["labels"][:, start:start + length] != -100).sum()))
    return {k: v[:, best:best + length] for k, v in row.items()}


def timed_rounds(timed: dict, work: dict, args) -> tuple[dict[str, Samples], int]:
    """`common.alternate`, one round at a time (starting candidate rotating), so that no round starts
    after `--budget-minutes` of wall time: (samples of the timed rounds, rounds timed)."""
    started = time.time()
    samples = {name: Samples(work=work[name]) for name in timed}
    names = list(timed)
    rounds = 0
    for index in range(args.warmup + args.repeats):
        if args.budget_minutes and rounds and (time.time() - started) / 60 > args.budget_minutes:
            break
        order = names[index % len(names):] + names[: index % len(names)]
        one = alternate({name: timed[name] for name in order}, repeats=1, warmup=0, clock="cpu", work=work)
        if index >= args.warmup:
            rounds += 1
            for name in names:
                samples[name].seconds += one[name].seconds
    return samples, rounds


def main() -> None:
    parser = base_parser(__doc__, default_repeats=3)
    parser.set_defaults(threads=1)
    parser.set_defaults(warmup=0)  # full-length warm-up rounds; a short warm-up step always runs
    parser.add_argument("--shape", default=None, choices=list(SHAPES), help="default qwen2.5-0.5b; quick with --quick")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                        help="sgd: no optimiser state (4 GB less at this shape), for a machine short of memory")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="start no timed round after this much wall time (the report says how many ran)")
    args = parser.parse_args()
    set_threads(args)
    shape_name = args.shape or ("quick" if args.quick else "qwen2.5-0.5b")
    config, seq_len = SHAPES[shape_name]
    if args.quick:
        args.repeats = min(args.repeats, 2)
    out = output_dir(args)
    report = Report("real_shape", f"The train step at the {shape_name} shape: bf16-mixed, packed rows of {seq_len}", args)

    with tempfile.TemporaryDirectory(prefix="llmstages-real-shape-") as tmp:
        rows, source = packed_rows(seq_len, 4, tmp)
    torch.manual_seed(0)
    ours = Transformer(config)
    ours.activation_checkpointing = True
    ours.train()
    hf = shared_hf_model(ours)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    else:
        optimizer = torch.optim.SGD(ours.parameters(), lr=1e-5)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    models = {"llmstages": (ours, ours_loss), "transformers": (hf, hf_loss)}

    def step(name: str, row: dict) -> None:
        model, loss_fn = models[name]
        with autocast():
            loss = loss_fn(model, row)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # the same-weights check and the warm-up (AdamW's state allocated, kernels built) on the first
    # seq_len / 8 tokens of row 1: a full step here costs minutes on one shared core
    short = labelled_window(rows[0], seq_len // 8)
    with torch.no_grad(), autocast():
        first = {name: float(loss_fn(model, short)) for name, (model, loss_fn) in models.items()}
    for name in models:
        step(name, short)

    rss: dict[str, list[float]] = {"llmstages": [], "transformers": []}
    position = {"llmstages": 0, "transformers": 0}

    def candidate(name: str):
        def run() -> None:
            position[name] += 1
            rss[name].append(peak_rss_gb(lambda: step(name, rows[position[name] % len(rows)])))

        return run

    timed = {name: candidate(name) for name in models}
    timed["matmul"], matmul_flops = matmul_candidate("cpu", torch.bfloat16, 1024)
    tokens = float(rows[0]["input_ids"].numel())
    work = {"llmstages": tokens, "transformers": tokens, "matmul": matmul_flops}
    samples, rounds = timed_rounds(timed, work, args)
    ratios = paired_ratios(samples["llmstages"], samples["transformers"])
    peak = samples["matmul"].rates()
    flops_token = ours.flops_per_token(seq_len)
    median = statistics.median(ratios)
    verdict = "met" if median >= TARGET else f"missed by {(1 - median / TARGET) * 100:.0f}%"
    labelled = [int((r["labels"] != -100).sum()) for r in rows]
    documents = [int(r["document_ids"].max()) + 1 for r in rows]

    report.text(
        f"Shape `{shape_name}`: vocab {config.vocab_size}, d_model {config.d_model}, {config.n_layer} layers, "
        f"{config.n_head} heads ({config.n_kv_head} kv), d_mlp {config.d_mlp}, q/k/v bias {config.qkv_bias}, "
        f"tied embeddings {config.tie_embeddings}; {ours.num_parameters() / 1e6:.1f}M parameters; "
        f"{flops_token / 1e9:.2f} GFLOP per token (forward + backward, PaLM formula; activation checkpointing's "
        f"recomputed forward not counted). Rows: 1 x {seq_len} from {source} packed by `SFTData(packing=\"documents\")`, "
        f"{', '.join(map(str, documents))} documents and {', '.join(map(str, labelled))} labelled tokens in the "
        f"{len(rows)} rows cycled through. bf16 autocast, activation checkpointing, "
        f"{'AdamW (for-loop)' if args.optimizer == 'adamw' else 'plain SGD (no state: AdamW did not fit in the free memory)'} "
        "shared by both candidates on the same parameters (see the module docstring). One torch thread, process CPU time; "
        f"before timing, the same-weights check and one warm-up step of each on a {seq_len // 8}-token slice "
        f"of row 1 (the one with the most labelled tokens), then {args.warmup} full warm-up round(s) and {rounds} timed round(s)"
        + (f" of {args.repeats} planned (none starts after --budget-minutes {args.budget_minutes:g})"
           if rounds < args.repeats else "")
        + ", each one step of each candidate and the matmul, starting candidate rotating; ratios per round, "
        "median (min–max). Other sessions share the 2 cores."
    )
    report.table(["ratio", "median (min–max)", "target", "verdict"],
                 [["llmstages / transformers tokens/s", med_range(ratios, "{:.2f}"), f"≥ {TARGET:.2f}", verdict]])
    rows_out = []
    for name in ("llmstages", "transformers"):
        rates = samples[name].rates()
        mfu = [r * flops_token / p * 100 for r, p in zip(rates, peak)]
        rows_out.append([name, med_range(rates, "{:,.1f}"), f"{statistics.median(samples[name].seconds):.1f}",
                         med_range(mfu, "{:.0f}"), f"{max(rss[name]):.2f}",
                         f"{first[name]:.5f}"])
    rows_out.append(["matmul 1024×1024 bf16 (GFLOP/s)", med_range([p / 1e9 for p in peak], "{:.1f}"), "", "100 (reference)",
                     "", ""])
    report.table(["candidate", "tokens/s median (min–max)", "CPU s per step (median)", "MFU % vs bf16 matmul",
                  "peak RSS during a step, GB (max)", f"loss on a {seq_len // 8}-token slice of row 1 before training"], rows_out)
    report.text(
        "MFU = tokens/s × FLOPs per token / the 1024×1024 bf16 matmul rate timed in the same rounds (a reference, "
        "not a ceiling). Peak RSS counts the one shared copy of weights and gradients"
        + (" and AdamW state (16 bytes per parameter: " if args.optimizer == "adamw" else
           " (8 bytes per parameter; AdamW's state would add 8 more, 16 in all: ")
        + f"{ours.num_parameters() * 16 / 1e9:.1f} GB) plus what the step itself holds."
    )
    report.write(out)


if __name__ == "__main__":
    main()
