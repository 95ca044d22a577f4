"""`llmstages fit|validate`: Lightning's own `LightningCLI`, plus one folder per run.

Design choices:
- Every stage's and data module's typed `__init__` is its CLI and its YAML
  schema (subclass mode: `model.class_path` / `data.class_path` pick them).
- The data's tokenizer size is linked into the model's `vocab_size`.
- Only `fit` and `validate` are offered: a stage has no `test_step` or
  `predict_step` (held-out evaluation is `validate` on a checkpoint;
  generation is `llmstages generate`).
- One run, one folder (`llmstages.run_plan`): `<root>/<stage>/<run name>/` with root
  `--trainer.default_root_dir` (else `runs`) and run name `--run_name` (else the start
  time). The folder, checkpoint folders, logger settings and resume point are decided
  once, by the pure `run_plan.plan_run`; the hooks here apply the plan (claim the
  folder, fill in the config, record `run.json`). Loggers whose `save_dir` and
  ModelCheckpoints whose `dirpath` are not set write there; explicit paths are
  respected. The config files name no run paths, so `--trainer.default_root_dir`
  alone moves a run.
- `--ckpt_path last|hpc|best|<file>` as Lightning means them (see `run_plan`); `last`
  continues its run in its own folder and W&B run (the id is in `run.json`). A
  checkpoint file is checked for readability before anything is built.
- A run that fails before training starts (a missing `init_from`) is recorded
  `failed` with its error; one stopped by SIGTERM is `preempted`, with a checkpoint
  at the step boundary, and exits with `PREEMPTED_EXIT_CODE` (`llmstages.preemption`).
- Always on: atomic checkpoint files (`AtomicCheckpointIO`), the non-finite guard
  (`--nonfinite stop|skip_step`, `--max_skipped_steps`), a progress bar that shows
  steps rather than `Epoch 2/-2`.
"""

from __future__ import annotations

import copy
import importlib
import os
import secrets
import string
import sys
import time
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from llmstages import checkpointing as ckpt
from llmstages import noise
from llmstages.callbacks import NonFiniteError, NonFiniteGuard, RunFolder
from llmstages.data.base import StageData
from llmstages.loggers import LoggedConfig
from llmstages.options import NonFinite
from llmstages.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionCheckpoint
from llmstages.run_plan import RUN_DIR_ENV, LoggerSpec, RunPlan, RunRequest, plan_run, slurm_job, survey
from llmstages.progress import make_progress_bar
from llmstages.stages.base import StageModule

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


def _quiet_upstream() -> None:
    noise.install()  # Lightning's Tip advertisements (already installed by the package import; idempotent)
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


def _resolve(class_path: str) -> type | None:
    """The class a config's class_path names (None when it cannot be imported here)."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return None


def _checkpoint_callbacks(cfg) -> list:
    out = []
    for callback in _items(cfg.trainer.callbacks):
        cls = _resolve(_class_path(callback))
        if cls is not None and issubclass(cls, ModelCheckpoint):
            out.append(callback)
    return out


def run_request(cfg, subcommand: str) -> RunRequest:
    """The parsed configuration's part in deciding the run folder."""
    loggers = tuple(
        LoggerSpec(cls=_resolve(_class_path(logger)), save_dir=logger.init_args.get("save_dir"),
                   name=logger.init_args.get("name"), id=logger.init_args.get("id"))
        for logger in _items(cfg.trainer.logger)
    )
    return RunRequest(
        stage=ckpt.stage_name(_class_path(cfg.model)) or "run", subcommand=subcommand,
        root=cfg.trainer.default_root_dir, run_name=cfg.get("run_name"), ckpt_path=cfg.get("ckpt_path"),
        loggers=loggers, logger_disabled=cfg.trainer.logger is False or cfg.trainer.logger is None,
        checkpoint_dirs=tuple(cb.init_args.get("dirpath") for cb in _checkpoint_callbacks(cfg)),
        rank=rank_zero_only.rank, new_run_name=time.strftime("%Y%m%d-%H%M%S"), new_wandb_id=_wandb_id(),
    )


def _wandb_id() -> str:
    # not `random`: seed_everything has just seeded it, so every run would get the same id
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class StagesCLI(LightningCLI):
    run_dir: Path | None = None
    plan: RunPlan | None = None

    def __init__(self, *args, **kwargs) -> None:
        try:
            super().__init__(*args, **kwargs)
        except BaseException as err:
            self._record_outcome(err)
            raise

    def _record_outcome(self, err: BaseException) -> None:
        """A run that stops before the trainer's callbacks could record it (a missing init_from, a bad data
        file) is `failed` in run.json with its error, never `running` for ever."""
        plan = self.plan
        if plan is None or not plan.record or not plan.run_dir.is_dir() or isinstance(err, SystemExit) and not err.code:
            return
        if ckpt.read_run_info(plan.run_dir).get("status") != "running":
            return  # RunFolder or PreemptionCheckpoint recorded the outcome
        preempted = isinstance(err, (Preempted, SIGTERMException))
        ckpt.write_run_info(plan.run_dir, status="preempted" if preempted else "failed",
                            **({} if preempted else {"error": f"{type(err).__name__}: {err}"}))

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
            self._apply_plan(self.config[subcommand], subcommand)

    def _apply_plan(self, cfg, subcommand: str) -> None:
        """Decide the run (`run_plan.plan_run`, pure), then do what it says: claim, check, record."""
        request = run_request(cfg, subcommand)
        plan = plan_run(request, survey(request, cfg.get("ckpt_path")), os.environ)
        if plan.claim:  # exclusive mkdir: a start-time name already taken gets `-2`, a given name is an error
            claimed = ckpt.claim_run_dir(plan.run_dir.parent, None if plan.timestamped else plan.run_dir.name,
                                         prefix="" if subcommand == "fit" else f"{subcommand}-")
            plan = plan.moved_to(claimed)
        for warning in plan.warnings:
            rank_zero_warn(warning)
        cfg.ckpt_path = plan.ckpt_path
        if plan.ckpt_path and plan.ckpt_path != "best":
            ckpt.check_checkpoint_file(plan.ckpt_path)  # fail before any data is built
            cfg.ckpt_path = os.path.realpath(plan.ckpt_path)  # `latest` links: record the run it really was
        init = getattr(cfg.model, "init_args", None)
        if init is not None and init.get("init_from"):
            init.init_from = os.path.realpath(init.init_from) if os.path.exists(init.init_from) else init.init_from
        self.plan, self.stage, self.run_dir = plan, request.stage, plan.run_dir
        if plan.record:
            os.environ[RUN_DIR_ENV] = str(plan.run_dir)  # for ranks Lightning's launcher starts (cleared on exit)
            started = ckpt.read_run_info(plan.run_dir).get("started", time.strftime("%Y-%m-%d %H:%M:%S"))
            job = slurm_job(os.environ)
            ckpt.write_run_info(
                plan.run_dir, stage=request.stage, name=plan.run_dir.name, command=subcommand, status="running",
                started=started, resumed_from=cfg.get("ckpt_path"), argv=sys.argv[1:],
                **({"slurm_job_id": job} if job else {}), clear=("error", "preempted_at_step", "finished"),
            )
            rank_zero_info(f"run folder: {plan.run_dir}")

    def before_instantiate_classes(self) -> None:
        if self.subcommand is None:  # run=False: objects only, no run to give a folder
            return
        cfg = self.config[self.subcommand]
        self._as_given = copy.deepcopy(cfg)  # saved as config.yaml: no run paths, so it can be reused as is
        plan = self.plan
        for logger, settings in zip(_items(cfg.trainer.logger), plan.loggers):
            for key in ("save_dir", "name", "id"):
                if getattr(settings, key) is not None:
                    logger.init_args[key] = getattr(settings, key)
            if settings.id is not None and plan.record and plan.run_dir.exists():
                ckpt.write_run_info(plan.run_dir, wandb_id=settings.id)
        for callback, dirpath in zip(_checkpoint_callbacks(cfg), plan.checkpoint_dirs):
            callback.init_args.dirpath = str(dirpath)
        cfg.trainer.default_root_dir = str(plan.run_dir)
        _tokenizer_from_model_folder(cfg)
        config_dir = plan.config_dir
        self.save_config_kwargs = {**self.save_config_kwargs, "run_dir": str(config_dir) if config_dir else None,
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
        if self.subcommand == "fit":
            callbacks.append(PreemptionCheckpoint(self.run_dir, self.plan.checkpoint_dir))
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

    From the command line, the run's own failures (a non-finite loss, a checkpoint that cannot be
    written) end with one line and exit code 1; a preempted run with one line and
    `PREEMPTED_EXIT_CODE`; an unreadable checkpoint or a run folder that cannot be chosen is a
    user error (`llmstages.errors`: one line, exit code 2, printed by `llmstages.cli`).
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
    except (Preempted, SIGTERMException) as err:
        if args is not None:
            raise
        print(f"llmstages: {str(err) or 'SIGTERM before the first step: nothing to save'}", file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except (NonFiniteError, ckpt.CheckpointWriteError) as err:  # the run failed (exit 1); user errors go on to `llmstages.cli` (exit 2)
        if args is not None:
            raise
        raise SystemExit(f"llmstages: {err}") from None
    finally:
        if owned_env:
            os.environ.pop(RUN_DIR_ENV, None)
