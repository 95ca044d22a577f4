"""What each masking, normalisation, packing, DPO and GRPO choice does, and how the alignment methods compare, family by family.

Every run of a family starts from the same checkpoint, trains the same steps
on the same data with several seeds, and only the family's option differs.
One module per family (`loss_mask`, `normalize`, `packing`, `dpo`, `grpo`, `alignment`,
each with `run(bench) -> results`); `runner` holds what they share (the base
checkpoints, trained through `configs/*.yaml` as `llmstages demo` chains
stages, metrics, training and evaluation), `report` writes the reports.

    python -m benchmarks.variants                     # every family, 3 seeds
    python -m benchmarks.variants --families dpo      # one family
    python -m benchmarks.variants --quick             # smoke run into a temp folder
    python -m benchmarks.variants --families loss_mask --sft-data ../shared/data/llamafactory/alpaca_en_demo.json
    python -m benchmarks.variants --families normalize --rebuild   # rewrite a report from its JSON

Reports: `<out>/<family>.md` with PNG plots beside them and a JSON of every
value; runs are grouped in offline W&B by family (`group`) and variant
(`job_type`), in `<cache>/wandb` (never beside the committed reports); `--no-wandb` turns it off,
`wandb sync <cache>/wandb/offline-run-*` uploads them.
"""
