"""Experiment tracking: W&B when you have it, offline when you don't, the config always.

Design choices:
- `WandbAutoLogger` is Lightning's `WandbLogger`, offline unless this machine
  is logged in (an API key in the environment or in ~/.netrc), so a run never
  blocks on a login prompt; `wandb sync` uploads an offline run later.
- `LoggedConfig` replaces LightningCLI's `SaveConfigCallback` to fix two
  known Lightning pitfalls (#7679, #11256): the resolved config reaches every
  logger (the W&B run's config, CSV's hparams.yaml), and a second run in the
  same folder writes `config-1.yaml` instead of crashing or overwriting the
  first run's file.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbAutoLogger(WandbLogger):
    def __init__(self, project: str = "llmstages", name: str | None = None, save_dir: str = ".",
                 offline: bool | None = None, log_model: bool = False, **kwargs) -> None:
        """
        Args:
            offline: None decides from the login state: online when logged in, offline otherwise.
        """
        if offline is None:
            offline = not wandb_logged_in() or os.environ.get("WANDB_MODE") == "offline"
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(project=project, name=name, save_dir=save_dir, offline=offline, log_model=log_model, **kwargs)


def _free_name(directory: Path, filename: str) -> Path:
    path = directory / filename
    stem, suffix = path.stem, path.suffix
    n = 1
    while path.exists():
        path = directory / f"{stem}-{n}{suffix}"
        n += 1
    return path


class LoggedConfig(SaveConfigCallback):
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if self.save_to_log_dir and trainer.is_global_zero:
            log_dir = Path(trainer.log_dir or trainer.default_root_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            path = _free_name(log_dir, self.config_filename)
            self.parser.save(self.config, str(path), skip_none=False, multifile=self.multifile)
            self.saved_path = path
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = _plain(self.config.as_dict())
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)
            else:
                logger.log_hyperparams({"config": config})


def _plain(value):
    """jsonargparse dicts may hold Path-like objects; loggers want plain data."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
