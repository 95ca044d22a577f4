"""`python -m benchmarks.variants`: the command line (see the package docstring)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks import variants
from benchmarks.common import RESULTS, Report, base_parser, output_dir, refuse_dirty_results
from benchmarks.variants import alignment, dpo, grpo, loss_mask, normalize, packing
from benchmarks.variants.report import rebuild_report, write_report
from benchmarks.variants.runner import Bench

FAMILIES = {"loss_mask": loss_mask.run, "normalize": normalize.run, "packing": packing.run, "dpo": dpo.run,
            "grpo": grpo.run, "alignment": alignment.run}


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(variants.__doc__.split("\n\n")[0], default_repeats=1)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--preset", default="demo", help="model preset (tiny, demo, small, ...)")
    parser.add_argument("--sft-data", nargs="+", type=Path, default=None,
                        help="SFT files (alpaca, sharegpt, messages) instead of the embedded tasks, e.g. "
                             "../shared/data/llamafactory/alpaca_en_demo.json; exact match stays on the embedded tasks")
    parser.add_argument("--pref-data", nargs="+", type=Path, default=None,
                        help="preference files for the dpo and alignment families instead of the embedded pairs")
    parser.add_argument("--scale", type=float, default=0.5, help="multiply every run's steps (1.0: 200 SFT, 150 DPO steps)")
    parser.add_argument("--eval", type=int, default=48, help="held-out prompts per evaluation")
    parser.add_argument("--cache", default=".cache/llmstages-variants", help="tokenizer, token caches, base checkpoints")
    parser.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True,
                        help="log every run to offline W&B under <cache>/wandb, grouped by family and variant")
    parser.add_argument("--rebuild", action="store_true", help="rewrite the reports and plots in --out from their JSON")
    args = parser.parse_args(argv)
    if args.rebuild:
        out = args.out or RESULTS
        refuse_dirty_results(out)
        for family in args.families:
            rebuild_report(family, out)
        return
    if args.quick:
        args.seeds, args.scale, args.eval, args.preset, args.wandb = args.seeds[:1], 0.02, 4, "tiny", False
    torch.set_num_threads(args.threads or 2)
    out = output_dir(args)
    bench = Bench(args, out)
    for family in args.families:
        report = Report(family, f"Variant family: `{family}`", args)
        results = FAMILIES[family](bench)
        write_report(family, results, args, out, report)


if __name__ == "__main__":
    main()
