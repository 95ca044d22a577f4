"""Packing gain: labelled tokens/s of SFT with `packing: documents` vs `none`.

Both layouts come from `SFTData` on the same conversations (LLaMA-Factory's
`alpaca_en_demo.json` from ../shared/data, the embedded conversations when
it is absent), with the same micro-batch token budget: `batch_size` rows of
at most `seq_len` tokens (`none` pads each batch to its longest example,
`documents` fills rows of `seq_len` by best-fit decreasing). Each timed
round trains the same number of micro-batches (forward with `document_ids`
when packed, chunked loss, backward, AdamW) with each layout, alternated;
the rate is the round's labelled tokens over its time. Packed rows attend
document by document (the model's `DocumentSpans`), so a row of `seq_len`
costs what its documents cost. Reported: the ratio of labelled tokens/s
(targets, issue #25: ≥ 2.5× at 8 × 1024, ≥ 3× at 4 × 4096; ≥ 2× at 4 × 1024),
the fraction of row positions holding real tokens, and of those holding targets.

    python -m benchmarks.packing_throughput                        # 4 x 1024, 8 x 1024, 4 x 4096
    python -m benchmarks.packing_throughput --shapes 8x1024 4x4096 --repeats 3
    python -m benchmarks.packing_throughput --quick                # 4 x 256, < 1 min
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import SHARED_DATA, Report, alternate, base_parser, data_files, med_range, output_dir, set_threads

from llmstages.data import SFTData
from llmstages.losses import IGNORE_INDEX, reduce_token_loss, token_logps
from llmstages.model.config import ModelConfig
from llmstages.model.transformer import Transformer

LAYOUTS = ("none", "documents")
TARGETS = {(4, 1024): 2.0, (8, 1024): 2.5, (4, 4096): 3.0}  # labelled tokens/s, documents over none


def parse_shape(text: str) -> tuple[int, int]:
    """`8x1024` -> (rows, seq_len)."""
    try:
        rows, length = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected ROWSxSEQ_LEN, e.g. 8x1024") from None
    return rows, length


def build_data(files: list[str] | None, packing: str, seq_len: int, batch: int, cache: str) -> SFTData:
    data = SFTData(files=files, packing=packing, seq_len=seq_len, batch_size=batch, val_fraction=0.0,
                   cache_dir=cache, seed=0)
    data.setup("fit")
    return data


def row_stats(data: SFTData) -> tuple[float, float, int]:
    """(real-token fraction, target fraction, micro-batches) over one epoch of the layout's batches."""
    real = labelled = positions = batches = 0
    for batch in data._loader(data.train_set, shuffle=True):
        pad = data.tokenizer.pad_id
        if "document_ids" in batch:
            real += int((batch["document_ids"] >= 0).sum())
        else:
            real += int((batch["input_ids"] != pad).sum())
        labelled += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        positions += batch["input_ids"].numel()
        batches += 1
    return real / positions, labelled / positions, batches


class Trainer:
    """One layout's model, optimiser and an endless stream of its micro-batches."""

    def __init__(self, data: SFTData, config: ModelConfig) -> None:
        torch.manual_seed(0)
        self.model = Transformer(config)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                           foreach=True)
        self.batches = itertools.cycle(list(data._loader(data.train_set, shuffle=True)))
        self.labelled: list[int] = []

    def run(self, steps: int) -> None:
        labelled = 0
        for _ in range(steps):
            batch = next(self.batches)
            labels = batch["labels"]
            head = lambda hidden, weight: token_logps(hidden, weight, labels)  # noqa: E731
            logps = self.model(batch["input_ids"], position_ids=batch["position_ids"],
                               document_ids=batch.get("document_ids"), head=head)
            loss = reduce_token_loss(-logps, labels)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            labelled += int((labels[:, 1:] != IGNORE_INDEX).sum())
        self.labelled.append(labelled)


def measure(files, seq_len: int, batch: int, steps: int, args, cache: str) -> dict:
    """One micro-batch shape: both layouts' row statistics and alternated labelled tokens/s."""
    datas = {p: build_data(files, p, seq_len, batch, cache) for p in LAYOUTS}
    vocab = datas["none"].vocab_size
    if args.quick:
        config = ModelConfig(vocab_size=vocab, d_model=64, n_layer=2, n_head=4, max_seq_len=seq_len)
    else:
        config = ModelConfig(vocab_size=vocab, d_model=256, n_layer=4, n_head=4, max_seq_len=seq_len)
    stats = {p: row_stats(datas[p]) for p in LAYOUTS}
    trainers = {p: Trainer(datas[p], config) for p in LAYOUTS}
    samples = alternate({p: (lambda p=p: trainers[p].run(steps)) for p in LAYOUTS},
                        repeats=args.repeats, warmup=args.warmup, clock="cpu")
    rates = {}
    for p in LAYOUTS:
        recorded = trainers[p].labelled[args.warmup:]  # the warm-up rounds are not timed
        rates[p] = [n / s for n, s in zip(recorded, samples[p].seconds)]
    ratios = [a / b for a, b in zip(rates["documents"], rates["none"])]
    return {"datas": datas, "config": config, "stats": stats, "rates": rates, "ratios": ratios}


def main() -> None:
    parser = base_parser(__doc__, default_repeats=5)
    parser.set_defaults(threads=1)
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=None,
                        help="micro-batches as ROWSxSEQ_LEN, one measurement each (default 4x1024 8x1024 4x4096; "
                             "4x256 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="micro-batches per timed round (default 4; 2 with --quick)")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "llamafactory" / "alpaca_en_demo.json")
    args = parser.parse_args()
    set_threads(args)
    steps = args.steps or (2 if args.quick else 4)
    shapes = args.shapes or ([(4, 256)] if args.quick else list(TARGETS))
    if args.quick:
        args.repeats = min(args.repeats, 3)
    out = output_dir(args)
    files, source = data_files(args.data, "the embedded SFT conversations")
    report = Report("packing_throughput", "Packing: labelled tokens/s with `packing: documents` vs `none`", args)

    ratio_rows, layout_rows = [], []
    with tempfile.TemporaryDirectory() as cache:
        for batch, seq_len in shapes:
            result = measure(files, seq_len, batch, steps, args, cache)
            median = statistics.median(result["ratios"])
            stats = result["stats"]
            bound = stats["documents"][0] / stats["none"][0]
            target = TARGETS.get((batch, seq_len))
            if target is None:
                verdict, target_text = "no target", "–"
            else:
                verdict = "met" if median >= target else f"missed by {(1 - median / target) * 100:.0f}%"
                target_text = f"≥ {target:.2f}"
            ratio_rows.append([f"{batch} × {seq_len}", med_range(result["ratios"], "{:.2f}"), f"{bound:.2f}",
                               target_text, verdict])
            for p in LAYOUTS:
                layout_rows.append([f"{batch} × {seq_len}", p, med_range(result["rates"][p], "{:,.0f}"),
                                    f"{stats[p][0]:.1%}", f"{stats[p][1]:.1%}", stats[p][2]])
    datas, config = result["datas"], result["config"]

    report.text(
        f"Data: {source}, {len(datas['none'].train_set)} examples after encoding ({datas['none'].truncated} "
        f"truncated to the row length), default tokenizer (vocab {datas['none'].vocab_size}), chatml, "
        "`loss_mask: assistant`. Micro-batch token budget: the same rows × `seq_len` for both layouts. Model: "
        f"d_model {config.d_model}, {config.n_layer} layers, {config.n_head} heads; AdamW foreach; {steps} "
        "micro-batches per timed round per layout, alternated; one torch thread, process CPU time (the cores "
        "are shared)."
    )
    report.text("## Ratio (labelled tokens/s, documents over none)")
    report.table(["micro-batch", "documents / none, median (min–max)", "bound: real-token fraction ratio",
                  "target", "verdict"], ratio_rows)
    report.text(
        "The bound is what packing can gain if compute were proportional to row positions: the ratio of the "
        "fractions of real tokens per row position. `none` pads each micro-batch only to its longest example, "
        "so the gain grows with the batch (a longer longest example, more padding)."
    )
    report.text("## Rows")
    report.table(
        ["micro-batch", "packing", "labelled tokens/s median (min–max)", "real tokens per row position",
         "targets per row position", "micro-batches per epoch"],
        layout_rows,
    )
    report.text(
        "`none` rows are shorter than `seq_len` but partly padding; `documents` runs full rows, attention "
        "document by document (causal SDPA per document, no `[T, T]` mask) and restarting positions."
    )
    report.write(out)


if __name__ == "__main__":
    main()
