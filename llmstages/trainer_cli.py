"""`llmstages fit|validate`: Lightning's own `LightningCLI`, nothing home-made.

Design choices:
- Every stage's and data module's typed `__init__` is its CLI and its YAML
  schema (subclass mode: `model.class_path` / `data.class_path` pick them).
- The data's tokenizer size is linked into the model's `vocab_size`.
- Only `fit` and `validate` are offered: a stage has no `test_step` or
  `predict_step` (held-out evaluation is `validate` on a checkpoint;
  generation is `llmstages generate`).
"""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

from llmstages.data.base import StageData
from llmstages.loggers import LoggedConfig
from llmstages.stages.base import StageModule


class StagesCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")


def lightning_cli(args: list[str] | None = None, run: bool = True) -> StagesCLI:
    """`args` None reads the command line; a list is a programmatic run (tests, the demo)."""
    with warnings.catch_warnings():
        # LightningCLI warns whenever `args` is given while sys.argv holds anything (every programmatic run)
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return StagesCLI(
            StageModule,
            StageData,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LoggedConfig,
            args=args,
            run=run,
        )
