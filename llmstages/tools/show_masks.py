"""`llmstages masks`: a viewer of exactly which tokens carry a loss.

Rows come from the configured data module's own batches (the same encode,
truncation and packing path as training), so what you see is what trains.
Labelled tokens are shown on green, document boundaries in packed rows as
`│`, padding is left out. Without colours (output piped to a file, `NO_COLOR`)
each labelled run is written between `⟦` and `⟧` instead, so the view reads in
plain text (the README's examples). `--html` writes the same view as a page
(rich's recorded console export). A reply with `weight: 0` is context: shown
unlabelled, and counted in the header.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser
from rich.console import Console
from rich.text import Text

from llmstages.data import StageData
from llmstages.data.batch import sequence_prefixes
from llmstages.losses import IGNORE_INDEX, count_targets

HELP = "show which tokens of a config's data carry a loss (terminal or --html)"

LABELLED = "black on green"
PROMPT = "dim"


def load_data_module(config_path: str | Path) -> StageData:
    config = yaml.safe_load(Path(config_path).read_text())
    if not isinstance(config, dict) or "data" not in config:
        raise ValueError(f"{config_path}: no `data:` section")
    parser = ArgumentParser()
    parser.add_subclass_arguments(StageData, "data")
    namespace = parser.parse_object({"data": config["data"]})
    return parser.instantiate_classes(namespace).data


OPEN, CLOSE = "⟦", "⟧"


def render_row(tokenizer, input_ids, labels, document_ids=None, marks: bool = False) -> Text:
    """One row; `marks` brackets each labelled run (for output without colours)."""
    text = Text()
    previous_doc = None
    inside = False
    for t, (token, label) in enumerate(zip(input_ids, labels)):
        doc = None if document_ids is None else int(document_ids[t])
        if doc == -1:
            break  # padding
        labelled = int(label) != IGNORE_INDEX
        if marks and inside and (not labelled or (previous_doc is not None and doc != previous_doc)):
            text.append(CLOSE)
            inside = False
        if previous_doc is not None and doc != previous_doc:
            text.append(" │ ", style="bold magenta")
        previous_doc = doc
        if marks and labelled and not inside:
            text.append(OPEN)
            inside = True
        piece = tokenizer.decode([int(token)])
        text.append(piece, style=LABELLED if labelled else PROMPT)
    if inside:
        text.append(CLOSE)
    return text


def show_masks(config: str | Path, n: int = 3, split: str = "train", html: str | None = None) -> None:
    data = load_data_module(config)
    data.setup("fit")
    dataset = data.train_set if split == "train" else data.val_set
    if not dataset:
        raise SystemExit(f"{config}: the {split} split is empty (val_fraction: {data.val_fraction})")
    console = Console(record=html is not None)
    marks = console.color_system is None
    legend = f"labelled between {OPEN} {CLOSE}" if marks else "[black on green]labelled[/] / [dim]not labelled[/]"
    console.print(f"[bold]{config}[/] ({split}): {legend}")
    context = getattr(data, "context_replies", 0)
    if context:
        console.print(f"{context} assistant replies have weight: 0 (context, not targets)")
    shown = 0
    for i in range(len(dataset)):
        if shown >= n:
            break
        item = dataset[i]
        batch = data._collate([item])
        for prefix in sequence_prefixes(batch):
            ids, labels = batch[f"{prefix}input_ids"][0], batch[f"{prefix}labels"][0]
            docs = batch.get(f"{prefix}document_ids")
            targets = count_targets(labels[None])
            console.rule(f"row {i}{' ' + prefix.rstrip('_') if prefix else ''}: {targets} target tokens of {len(ids)}")
            console.print(render_row(data.tokenizer, ids.tolist(), labels.tolist(), None if docs is None else docs[0].tolist(), marks))
        shown += 1
    if html:
        Path(html).parent.mkdir(parents=True, exist_ok=True)
        console.save_html(html)
        console.print(f"wrote {html}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="llmstages masks", description=HELP)
    parser.add_argument("--config", required=True, help="a stage config with a `data:` section")
    parser.add_argument("-n", type=int, default=3, help="how many rows to show")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--html", help="also write the rows to this HTML file")
    args = parser.parse_args(argv)
    show_masks(args.config, n=args.n, split=args.split, html=args.html)
