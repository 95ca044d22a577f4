"""`llmstages fit|validate`: Lightning's own `LightningCLI`, plus one folder per run.

Design choices:
- Every stage's and data module's typed `__init__` is its CLI and its YAML
  schema (subclass mode: `model.class_path` / `data.class_path` pick them).
- The data's tokenizer size is linked into the model's `vocab_size`.
- Only `fit` and `validate` are offered: a stage has no `test_step` or
  `predict_step` (held-out evaluation is `validate` on a checkpoint;
  generation is `llmstages generate`).
- One run, one folder (`llmstages.checkpointing`): `<root>/<stage>/<run name>/`
  with root `--trainer.default_root_dir` (else `runs`) and run name `--run_name`
  (else the start time). Loggers whose `save_dir` and ModelCheckpoints whose
  `dirpath` are not set write there; explicit paths are respected. The config
  files name no run paths, so `--trainer.default_root_dir` alone moves a run.
- `--ckpt_path last` continues a run in its own folder: the `--run_name` one, else
  the run of that stage whose `last.ckpt` is newest; it continues its W&B run too
  (the id is in `run.json`). A `--ckpt_path` file is checked for readability before
  anything is built.
- Rank 0 claims the folder; processes Lightning spawns inherit it through the
  environment (`LLMSTAGES_RUN_DIR`); under an external launcher (torchrun, srun)
  the other ranks never write a file, and ModelCheckpoint broadcasts rank 0's
  folder at set-up.
- Always on: atomic checkpoint files (`AtomicCheckpointIO`), the non-finite guard
  (`--nonfinite stop|skip_step`, `--max_skipped_steps`), a progress bar that shows
  steps rather than `Epoch 2/-2`.
"""

from __future__ import annotations

import copy
import logging
import os
import secrets
import string
import sys
import time
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only

from llmstages import checkpointing as ckpt
from llmstages.callbacks import NonFiniteError, NonFiniteGuard, RunFolder
from llmstages.data.base import StageData
from llmstages.loggers import LoggedConfig
from llmstages.options import NonFinite
from llmstages.progress import make_progress_bar
from llmstages.stages.base import StageModule

RUN_DIR_ENV = "LLMSTAGES_RUN_DIR"
DEFAULT_ROOT = "runs"

# upstream noise that says nothing about this run
_QUIET = (
    ".*args parameter is intended to run from within Python.*",  # LightningCLI, on every programmatic run
    ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    ".*The '\\w+_dataloader' does not have many workers.*",
    ".*Checkpoint directory .* exists and is not empty.*",  # a resumed run's own folder
    ".*The dirpath has changed from .*",  # validate restores a fit's ModelCheckpoint into its own (unwritten) folder
    # the stages log metrics already reduced over ranks (torchmetrics / WeightedMeans)
    ".*It is recommended to use `self.log\\(.*sync_dist=True\\)` when logging on epoch level.*",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")  # Lightning's advertisement on every fit


def _quiet_upstream() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    for message in _QUIET:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="(torch|lightning|jsonargparse|wandb).*")
    os.environ.setdefault("WANDB_CONSOLE", "off")  # wandb's console capture would re-echo every line


def _class_path(value) -> str:
    return str(getattr(value, "class_path", "") or "")


def _items(value) -> list:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _wandb_id() -> str:
    # not `random`: seed_everything has just seeded it, so every run would get the same id
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class StagesCLI(LightningCLI):
    run_dir: Path | None = None

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.add_argument(
            "--run_name", type=str | None, default=None,
            help="this run's folder under <trainer.default_root_dir or runs>/<stage>/ (default: the start time); "
                 "with --ckpt_path last, the run to continue",
        )
        parser.add_argument(
            "--nonfinite", type=NonFinite, default="stop",
            help="a non-finite loss or gradient norm: stop (non-zero exit, nothing non-finite saved) or skip_step",
        )
        parser.add_argument(
            "--max_skipped_steps", type=int, default=10, help="with --nonfinite skip_step: stop after this many skips",
        )

    # ----------------------------------------------------------------- the run folder

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            self._resolve_run(self.config[subcommand], subcommand)

    def _resolve_run(self, cfg, subcommand: str) -> None:
        stage = ckpt.stage_name(_class_path(cfg.model)) or "run"
        root = Path(cfg.trainer.default_root_dir or DEFAULT_ROOT)
        stage_root = root / stage
        self.stage = stage
        ckpt_path = cfg.get("ckpt_path")
        inherited = os.environ.get(RUN_DIR_ENV)
        if inherited:  # a process Lightning spawned for another rank: rank 0 chose the folder
            run_dir = Path(inherited)
        elif ckpt_path == "last" and subcommand == "fit":
            run_dir = ckpt.find_resumable_run(stage_root, cfg.get("run_name"))
        elif ckpt_path and ckpt_path not in ("last", "best") and subcommand == "fit" and ckpt.run_of_checkpoint(Path(ckpt_path)):
            run_dir = ckpt.run_of_checkpoint(Path(ckpt_path))  # resuming a run's own checkpoint continues that run
        elif rank_zero_only.rank == 0:
            prefix = "" if subcommand == "fit" else f"{subcommand}-"  # a validate run never looks like a fit
            run_dir = ckpt.claim_run_dir(stage_root, cfg.get("run_name"), prefix=prefix)
        else:  # another rank under torchrun/srun: never creates anything; ModelCheckpoint broadcasts rank 0's folder
            run_dir = stage_root / (cfg.get("run_name") or f"pending-rank{rank_zero_only.rank}")
        if ckpt_path == "last":
            cfg.ckpt_path = str(run_dir / "checkpoints" / "last.ckpt")
        if cfg.get("ckpt_path") and cfg.ckpt_path != "best":
            ckpt.check_checkpoint_file(cfg.ckpt_path)  # fail before any data is built
            cfg.ckpt_path = os.path.realpath(cfg.ckpt_path)  # `latest` links: record the run it really was
        init = getattr(cfg.model, "init_args", None)
        if init is not None and init.get("init_from"):
            init.init_from = os.path.realpath(init.init_from) if os.path.exists(init.init_from) else init.init_from
        self.run_dir = run_dir
        if rank_zero_only.rank == 0 and not inherited:
            os.environ[RUN_DIR_ENV] = str(run_dir)  # for ranks Lightning's launcher starts (cleared on exit)
            resumed = ckpt.read_run_info(run_dir)
            ckpt.write_run_info(
                run_dir, stage=stage, name=run_dir.name, command=subcommand,
                status="running", started=resumed.get("started", time.strftime("%Y-%m-%d %H:%M:%S")),
                resumed_from=cfg.get("ckpt_path"), argv=sys.argv[1:],
            )
            rank_zero_info(f"run folder: {run_dir}")

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:  # run=False: objects only, no run to give a folder
            return
        cfg = self.config[self.subcommand]
        self._as_given = copy.deepcopy(cfg)  # saved as config.yaml: no run paths, so it can be reused as is
        run_dir = self.run_dir
        info = ckpt.read_run_info(run_dir) if run_dir.exists() else {}
        derived = True
        for logger in _items(cfg.trainer.logger):
            init = logger.init_args
            if init.get("save_dir") is not None:
                derived = False
                continue
            init.save_dir = str(run_dir)
            if "CSV" in _class_path(logger) or "TensorBoard" in _class_path(logger):
                init.name = "csv" if "CSV" in _class_path(logger) else "tensorboard"  # <run>/csv/version_<n>/
            if "Wandb" in _class_path(logger):
                wandb_id = init.get("id") or info.get("wandb_id") or _wandb_id()
                init.id = wandb_id
                init.name = f"{init.get('name') or self.stage}/{run_dir.name}"
                if rank_zero_only.rank == 0 and run_dir.exists():
                    ckpt.write_run_info(run_dir, wandb_id=wandb_id)
        if cfg.trainer.logger is False or cfg.trainer.logger is None:
            derived = True
        for callback in _items(cfg.trainer.callbacks):
            if _class_path(callback).endswith("ModelCheckpoint") and callback.init_args.get("dirpath") is None:
                callback.init_args.dirpath = str(run_dir / "checkpoints")
        cfg.trainer.default_root_dir = str(run_dir)
        _tokenizer_from_model_folder(cfg)
        self.save_config_kwargs = {**self.save_config_kwargs, "run_dir": str(run_dir) if derived else None,
                                   "as_given": self._as_given}

    def instantiate_trainer(self, **kwargs):
        if self.subcommand is None:
            return super().instantiate_trainer(**kwargs)
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        cfg = self.config[self.subcommand]
        callbacks = _items(trainer_cfg.get("callbacks"))
        callbacks.append(NonFiniteGuard(self.stage, action=cfg.get("nonfinite") or "stop",
                                        max_skipped_steps=cfg.get("max_skipped_steps", 10)))
        callbacks.append(RunFolder(self.run_dir, finish=self.subcommand == "fit"))
        if trainer_cfg.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(make_progress_bar(self.stage))  # a step bar in a terminal, plain lines in a log
        plugins = _items(trainer_cfg.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(ckpt.AtomicCheckpointIO())
        return super().instantiate_trainer(**{"callbacks": callbacks, "plugins": plugins or None, **kwargs})


def _tokenizer_from_model_folder(cfg) -> None:
    """A Hugging Face `init_from` folder is model + tokenizer + chat template: with no tokenizer given,
    the data module reads the folder's (never silently the embedded default's)."""
    model, data = getattr(cfg.model, "init_args", None), getattr(cfg.data, "init_args", None)
    folder = model.get("init_from") if model is not None else None
    if data is None or data.get("tokenizer") is not None or not folder or not Path(folder).is_dir():
        return
    if not (Path(folder) / "tokenizer.json").is_file():
        raise ValueError(
            f"init_from {folder}: the model folder has no tokenizer.json; pass the model's tokenizer as "
            "--data.init_args.tokenizer (the embedded default tokenizer does not match a downloaded model)"
        )
    data.tokenizer = str(folder)
    rank_zero_info(f"tokenizer and chat template: {folder} (the init_from model folder)")


def lightning_cli(args: list[str] | None = None, run: bool = True) -> StagesCLI:
    """`args` None reads the command line; a list is a programmatic run (tests, the demo).

    From the command line, a non-finite loss ends the run with one line and exit code 1; an
    unreadable checkpoint or a run folder that cannot be chosen is a user error (`llmstages.errors`:
    one line, exit code 2, printed by `llmstages.cli`).
    """
    owned_env = RUN_DIR_ENV not in os.environ
    try:
        with warnings.catch_warnings():
            _quiet_upstream()
            return StagesCLI(
                StageModule,
                StageData,
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_callback=LoggedConfig,
                args=args,
                run=run,
            )
    except NonFiniteError as err:  # the run failed (exit 1); user errors go on to `llmstages.cli` (exit 2)
        if args is not None:
            raise
        raise SystemExit(f"llmstages: {err}") from None
    finally:
        if owned_env:
            os.environ.pop(RUN_DIR_ENV, None)
