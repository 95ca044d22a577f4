"""Experiment tracking: W&B when you have it, offline when you don't, never a killed run.

Design choices:
- `WandbAutoLogger` is Lightning's `WandbLogger`, offline unless this machine
  is logged in (an API key in the environment or in ~/.netrc), so a run never
  blocks on a login prompt; `wandb sync` uploads an offline run later.
- W&B never kills or stalls a run: before going online the server is probed
  (one TCP connect, `probe_timeout` seconds) and `wandb.init` gets a bounded
  `init_timeout`; any failure to start falls back to offline, and when even
  offline W&B cannot start (its folder is not writable) to a CSV log in the
  same folder, with one warning that says how to sync later. A W&B error
  while logging is reported once, with the step from which the metrics are in
  the CSV only; training goes on.
- Metrics are never lost: every metric is mirrored to a CSV in the same folder
  (`csv_mirror`, on by default), flushed at every checkpoint, so whatever happens
  to W&B's own files (a run killed in its first seconds leaves a 7-byte offline
  file), the CSV holds every step up to the resume point and every step after
  a W&B failure.
- W&B's own console output is kept to warnings (`quiet`), unless WANDB_QUIET /
  WANDB_SILENT say otherwise.
- `LoggedConfig` replaces LightningCLI's `SaveConfigCallback` to fix two
  known Lightning pitfalls (#7679, #11256): the resolved config reaches every
  logger (the W&B run's config, CSV's hparams.yaml), and a second run in the
  same folder writes `config-1.yaml` instead of crashing or overwriting the
  first run's file. Every rank makes the same collective calls in `setup`
  (`trainer.log_dir` broadcasts; a rank-0-only read hung multi-process runs).
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

# a logging warning, not warnings.warn: it must show even under PYTHONWARNINGS=ignore
log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def server_reachable(timeout: float) -> str | None:
    """None when the W&B server accepts a TCP connection within `timeout` s, else why not."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL))
    host = url.hostname or "api.wandb.ai"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}:{port} unreachable ({err.__class__.__name__}: {err})"


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger with an optional `save_dir`: the CLI puts it in the run folder
    (`<run>/csv/version_<n>/metrics.csv`, a new version for each resumed attempt)."""

    def __init__(self, save_dir: str | None = None, name: str = "csv", **kwargs) -> None:
        super().__init__(save_dir=save_dir or ".", name=name, **kwargs)


class WandbAutoLogger(WandbLogger):
    def __init__(self, project: str = "llmstages", name: str | None = None, save_dir: str | None = None,
                 offline: bool | None = None, log_model: bool = False, id: str | None = None,
                 init_timeout: float = 10.0, probe_timeout: float = 3.0, csv_mirror: bool = True, **kwargs) -> None:
        """
        Args:
            save_dir: where W&B writes (`<save_dir>/wandb/`); null: the run folder (from the CLI), else ".".
            offline: None decides from the login state: online when logged in, offline otherwise.
            id: the W&B run id; the CLI keeps one per run folder, so a resumed run continues its W&B run.
            init_timeout: seconds `wandb.init` may take online before the run goes offline instead.
            probe_timeout: seconds to wait for the server's TCP connect before going offline.
            csv_mirror: also write every metric to `<save_dir>/csv/version_<n>/metrics.csv`, flushed at every
                checkpoint, so no metric before a resume point is lost even when W&B's own files are not
                (a run killed in its first seconds leaves a 7-byte offline file). False: CSV only once W&B fails.
        """
        if offline is None:
            offline = not wandb_logged_in() or os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled")
        self._init_timeout, self._probe_timeout = init_timeout, probe_timeout
        self._csv_mirror = csv_mirror
        self._csv: _LightningCSVLogger | None = None  # the mirror, or the fallback once W&B is down
        self._down = False  # W&B failed (to start, or while logging): the CSV alone from then on
        self.failed_at_step: int | None = None
        super().__init__(project=project, name=name, save_dir=save_dir or ".", offline=offline,
                         log_model=log_model, id=id, **kwargs)

    # ----------------------------------------------------------------- start, with fallbacks

    def _settings(self, offline: bool):
        import wandb

        settings = {"init_timeout": self._init_timeout}
        if not (os.environ.get("WANDB_QUIET") or os.environ.get("WANDB_SILENT")):
            # W&B's own lines at warning level; offline W&B prints its banner unless silent (we print one line)
            settings.update(quiet=True, show_info=False) if not offline else settings.update(silent=True)
        return wandb.Settings(**settings)

    def _init(self, offline: bool):
        import wandb

        init = {k: v for k, v in self._wandb_init.items() if not (k == "anonymous" and v is None)}
        init["mode"] = "offline" if offline else "online"
        init["settings"] = self._settings(offline)
        return wandb.init(**init)

    def _start(self):
        import wandb

        if wandb.run is not None:
            return wandb.run  # a run started by the user (Lightning's behaviour)
        Path(self._save_dir or ".").mkdir(parents=True, exist_ok=True)
        reason = None
        if not self._offline:
            started = time.monotonic()
            reason = server_reachable(self._probe_timeout)
            if reason is None:
                try:
                    return self._init(offline=False)
                except Exception as err:  # noqa: BLE001 - any failure to go online means offline
                    reason = f"{type(err).__name__}: {err} after {time.monotonic() - started:.0f} s"
                    _finish_quietly()
        try:
            run = self._init(offline=True)
        except Exception as err:  # noqa: BLE001 - offline impossible too: CSV keeps the metrics
            self._down = True
            log.warning(
                f"W&B could not start ({reason + '; ' if reason else ''}offline: {type(err).__name__}: {err}); "
                f"logging CSV to {self._csv_logger().log_dir} instead"
            )
            _finish_quietly()
            return None
        where = str(Path(run.dir).parent) if getattr(run, "dir", None) else str(Path(self._save_dir or ".") / "wandb")
        if reason is not None:
            self._offline = True
            log.warning(f"W&B online failed ({reason}); this run logs offline to {where}. Upload it later with: wandb sync {where}")
        else:
            rank_zero_info(f"W&B offline: {where} (upload later with: wandb sync {where})")
        return run

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None and not self._down:
            run = self._start()
            if run is not None:
                self._experiment = run
                if getattr(run, "define_metric", None):
                    run.define_metric("trainer/global_step")
                    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        if self._down and self._experiment is None:
            return self._csv_logger().experiment
        return self._experiment

    def _csv_logger(self) -> _LightningCSVLogger:
        if self._csv is None:
            self._csv = _LightningCSVLogger(save_dir=self._save_dir or ".", name="csv")
        return self._csv

    # ----------------------------------------------------------------- logging that never stops training or loses a metric

    def _guarded(self, what: str, fn, *args, step: int | None = None, **kwargs) -> bool:
        """Run one W&B call; False when W&B is down or this call failed (then it is down for the rest of the run)."""
        if not self._down and self._experiment is None:
            _ = self.experiment
        if self._down:
            return False
        try:
            fn(*args, **kwargs)
            return True
        except Exception as err:  # noqa: BLE001 - tracking must never end a training run
            self._down, self.failed_at_step = True, step
            at = f" at step {step}" if step is not None else ""
            log.warning(f"W&B {what} failed{at} ({type(err).__name__}: {err}); training goes on, and "
                        f"{'from step ' + str(step) if step is not None else 'from now'} on the metrics are logged "
                        f"to {Path(self._csv_logger().log_dir) / 'metrics.csv'} only (reported once)")
            return False

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        if self._csv_mirror:
            self._csv_logger().log_metrics(metrics, step)
        if not self._guarded("log_metrics", super().log_metrics, metrics, step, step=step) and not self._csv_mirror:
            self._csv_logger().log_metrics(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        if self._csv_mirror or self._down:
            self._csv_logger().log_hyperparams(params)
        self._guarded("log_hyperparams", super().log_hyperparams, params)

    @rank_zero_only
    def log_text(self, *args, **kwargs) -> None:
        self._guarded("log_text", super().log_text, *args, **kwargs)

    @rank_zero_only
    def log_table(self, *args, **kwargs) -> None:
        self._guarded("log_table", super().log_table, *args, **kwargs)

    def update_config(self, config: dict) -> None:
        """The resolved config into the W&B run's config (and the CSV's hparams)."""
        if not self._down and self._experiment is None:
            _ = self.experiment
        if self._csv_mirror or self._down:
            self._csv_logger().log_hyperparams({"config": config})
        self._guarded("config update", lambda: self._experiment.config.update(config, allow_val_change=True))

    @rank_zero_only
    def save(self) -> None:
        if self._csv is not None:
            self._csv.save()
        super().save()

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        if self._csv is not None:
            self._csv.save()  # every metric up to the checkpoint is on disk before a resume can start from it
        self._guarded("after_save_checkpoint", super().after_save_checkpoint, checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._csv is not None:
            self._csv.finalize(status)
        self._guarded("finalize", super().finalize, status)


def _finish_quietly() -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=1, quiet=True)
    except Exception:  # noqa: BLE001 - cleaning up after a failed start
        pass


def _free_name(directory: Path, filename: str) -> Path:
    path = directory / filename
    stem, suffix = path.stem, path.suffix
    n = 1
    while path.exists():
        path = directory / f"{stem}-{n}{suffix}"
        n += 1
    return path


class LoggedConfig(SaveConfigCallback):
    def __init__(self, parser, config, *args, run_dir: str | None = None, as_given=None, **kwargs) -> None:
        """
        Args:
            run_dir: where config.yaml goes (the CLI's run folder); None: the trainer's log_dir.
            as_given: the config to save, before the CLI filled in run paths (so it can be reused as is).
        """
        super().__init__(parser, config, *args, **kwargs)
        self.run_dir, self.as_given = run_dir, as_given

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        if self.save_to_log_dir:
            # every rank asks: trainer.log_dir is a collective (broadcast) in Lightning
            log_dir = Path(self.run_dir) if self.run_dir else Path(trainer.log_dir or trainer.default_root_dir)
            if trainer.is_global_zero:
                log_dir.mkdir(parents=True, exist_ok=True)
                path = _free_name(log_dir, self.config_filename)
                config = self.as_given if self.as_given is not None else self.config
                self.parser.save(config, str(path), skip_none=False, multifile=self.multifile)
                self.saved_path = path
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = _plain(self.config.as_dict())
        for logger in trainer.loggers:
            if isinstance(logger, WandbAutoLogger):
                logger.update_config(config)
            elif isinstance(logger, WandbLogger):
                logger.experiment.config.update(config, allow_val_change=True)
            else:
                logger.log_hyperparams({"config": config})


def _plain(value):
    """jsonargparse dicts may hold Path-like objects; loggers want plain data."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
