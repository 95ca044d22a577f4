"""`llmstages masks`: a viewer of exactly which tokens carry a loss.

Rows come from the configured data module's own batches (the same encode,
truncation and packing path as training), so what you see is what trains.
`--data.*` options override the config's data section exactly as they do
for `llmstages fit` (`--data.init_args.loss_mask last_assistant`).

Design choices:
- In a terminal, labelled tokens are on green. Without colour (piped, or
  `NO_COLOR`) the distinction is kept in plain text: each run of labelled
  tokens is wrapped in `⟦` `⟧`, so the output of `llmstages masks | less`
  or a log file still says which tokens train. Document boundaries in packed
  rows are `│`; padding is left out.
- `--html` writes the coloured view as a page (rich's recorded console export).
- A reply with `weight: 0` is context: shown unlabelled, and counted in the header.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmstages.tools import TOOLS

HELP = TOOLS["masks"].help

LABELLED = "black on green"
PROMPT = "dim"
OPEN, CLOSE = "⟦", "⟧"  # around labelled runs when there is no colour (characters data rarely holds)


def load_data_module(config_path: str | Path, overrides: list[str] | None = None):
    """The config's data module (a `StageData`), with `--data.*` command-line overrides applied."""
    import json

    import yaml
    from jsonargparse import ArgumentParser

    from llmstages.data import StageData
    from llmstages.errors import UserError

    path = Path(config_path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or "data" not in config:
        raise UserError(f"{path}: no `data:` section")
    wrong = [a for a in overrides or [] if a.startswith("--") and not a.startswith("--data")]
    if wrong:
        raise UserError(f"{wrong[0]}: masks takes --config, -n, --split, --html and --data.* options only")
    parser = ArgumentParser(prog="llmstages masks", exit_on_error=False)
    parser.add_subclass_arguments(StageData, "data")
    try:
        namespace = parser.parse_args(["--data", json.dumps(config["data"]), *(overrides or [])])
    except Exception as error:  # jsonargparse's ArgumentError: a bad key or value, said by the parser
        raise UserError(f"{path}: data: {error}") from None
    return parser.instantiate_classes(namespace).data


def render_row(tokenizer, input_ids, labels, document_ids=None, plain: bool = False):
    """One row as rich `Text`: labelled tokens styled, and in `plain` mode also bracketed."""
    from rich.text import Text

    from llmstages.losses import IGNORE_INDEX

    text = Text()
    previous_doc = None
    inside = False
    for t, (token, label) in enumerate(zip(input_ids, labels)):
        doc = None if document_ids is None else int(document_ids[t])
        if doc == -1:
            break  # padding
        labelled = int(label) != IGNORE_INDEX
        boundary = previous_doc is not None and doc != previous_doc
        if plain and inside and (boundary or not labelled):
            text.append(CLOSE)
            inside = False
        if boundary:
            text.append(" │ ", style="bold magenta")
        previous_doc = doc
        if plain and labelled and not inside:
            text.append(OPEN)
            inside = True
        text.append(tokenizer.decode([int(token)]), style=LABELLED if labelled else PROMPT)
    if inside:
        text.append(CLOSE)
    return text


def show_masks(config: str | Path, n: int = 3, split: str = "train", html: str | None = None,
               overrides: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape

    from llmstages.data.batch import sequence_prefixes
    from llmstages.errors import UserError
    from llmstages.losses import count_targets

    data = load_data_module(config, overrides)
    data.setup("fit")
    dataset = data.train_set if split == "train" else data.val_set
    if not dataset:
        raise UserError(f"{config}: the {split} split is empty (val_fraction: {data.val_fraction})")
    console = Console(record=html is not None)
    plain = console.no_color or not console.is_terminal or console.color_system is None
    legend = escape(f"{OPEN}labelled{CLOSE} / not labelled") if plain else "[black on green]labelled[/] / [dim]not labelled[/]"
    console.print(f"[bold]{config}[/] ({split}): {legend}")
    context = getattr(data, "context_replies", 0)
    if context:
        console.print(f"{context} assistant replies have weight: 0 (context, not targets)")
    shown = 0
    for i in range(len(dataset)):
        if shown >= n:
            break
        batch = data.collate([dataset[i]])
        for prefix in sequence_prefixes(batch):
            ids, labels = batch[f"{prefix}input_ids"][0], batch[f"{prefix}labels"][0]
            docs = batch.get(f"{prefix}document_ids")
            targets = count_targets(labels[None])
            console.rule(f"row {i}{' ' + prefix.rstrip('_') if prefix else ''}: {targets} target tokens of {len(ids)}")
            console.print(render_row(data.tokenizer, ids.tolist(), labels.tolist(),
                                     None if docs is None else docs[0].tolist(), plain=plain))
        shown += 1
    if html:
        Path(html).parent.mkdir(parents=True, exist_ok=True)
        console.save_html(html)
        console.print(f"wrote {html}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="llmstages masks", description=HELP,
        epilog="--data.KEY VALUE overrides the config's data section as in `llmstages fit`, "
               "e.g. --data.init_args.loss_mask last_assistant --data.init_args.seq_len 128",
    )
    parser.add_argument("--config", required=True, help="a stage config with a `data:` section")
    parser.add_argument("-n", type=int, default=3, help="how many rows to show")
    parser.add_argument("--split", choices=("train", "val"), default="train")
    parser.add_argument("--html", help="also write the rows to this HTML file")
    args, overrides = parser.parse_known_args(argv)
    show_masks(args.config, n=args.n, split=args.split, html=args.html, overrides=overrides)
