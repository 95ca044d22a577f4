"""Drive the real `llmstages` console entry point in subprocesses, with timeouts that fail instead of hanging."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BIN = Path(sys.executable).parent
LLMSTAGES = str(BIN / "llmstages")
TORCHRUN = str(BIN / "torchrun")


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSTAGES_", "WANDB_"))}
    path = os.pathsep.join(p for p in (str(ROOT), base.get("PYTHONPATH")) if p)  # benchmarks.fault_injection
    return {**base, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "PYTHONWARNINGS": "ignore", "PYTHONPATH": path, **extra}


def tiny_fragment(tmp: Path, cache: Path, *, steps: int, every: int | None = None, stage: str = "sft",
                  seq_len: int = 64, batch_size: int = 4, accumulate: int = 1, extra: dict | None = None,
                  kill_at: int | None = None, signal_at: dict | None = None) -> Path:
    """A config fragment: tiny model, short rows, CSV logging every step, checkpoints every `every` steps;
    with `kill_at`, the run SIGKILLs itself (its whole group) right after step `kill_at`'s checkpoint;
    with `signal_at`, it signals itself as `benchmarks.fault_injection.SignalAtStep(**signal_at)` says."""
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"save_last": True, "every_n_train_steps": every or steps}}]
    if kill_at is not None:
        callbacks.append({"class_path": "benchmarks.fault_injection.KillAtStep", "init_args": {"step": kill_at}})
    if signal_at is not None:
        callbacks.append({"class_path": "benchmarks.fault_injection.SignalAtStep", "init_args": dict(signal_at)})
    model = {"preset": "tiny"}
    if stage == "sft":
        model.update(generate_samples=0)
    override = {
        "trainer": {
            "max_steps": steps, "accumulate_grad_batches": accumulate, "log_every_n_steps": 1,
            "val_check_interval": 10_000, "limit_val_batches": 0, "enable_progress_bar": False,
            "enable_model_summary": False, "callbacks": callbacks,
            "logger": {"class_path": "llmstages.loggers.CSVLogger", "init_args": {"flush_logs_every_n_steps": 1}},
        },
        "model": {"init_args": model},
        "data": {"init_args": {"cache_dir": str(cache), "batch_size": batch_size,
                               **({"seq_len": seq_len} if stage != "grpo" else {})}},
    }
    for section, values in (extra or {}).items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(override.get(section, {}).get(key), dict):
                override[section][key].update(value)
            else:
                override.setdefault(section, {})[key] = value
    path = tmp / f"tiny-{stage}-{steps}-{every}-{accumulate}-{len(list(tmp.glob('tiny-*')))}.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def fit_args(stage: str, fragment: Path, *more: str) -> list[str]:
    return ["fit", "--config", str(CONFIGS / f"{stage}.yaml"), "--config", str(fragment), *more]


def run(args: list[str], cwd: Path, timeout: float = 120, launcher: list[str] | None = None,
        stdin: str | None = None, **env_extra: str):
    """Run `llmstages <args>` (or `<launcher> <args>`), with `stdin` as its input; a run past `timeout` is killed
    and fails the test."""
    command = [*(launcher or [LLMSTAGES]), *args]
    try:
        return subprocess.run(command, cwd=cwd, env=env(**env_extra), capture_output=True, text=True, timeout=timeout,
                              start_new_session=True, input=stdin)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"timed out after {timeout} s (a hang?): {' '.join(command)}\n{(err.stderr or b'')[-3000:]}") from None


def start(args: list[str], cwd: Path, **env_extra: str) -> subprocess.Popen:
    return subprocess.Popen([LLMSTAGES, *args], cwd=cwd, env=env(**env_extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def step_losses(run_dir: Path, key: str = "train/loss") -> dict[int, list[float]]:
    """step -> the logged values of `key`, over every attempt (csv/version_*) of a run."""
    out: dict[int, list[float]] = defaultdict(list)
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    out[int(row["step"])].append(float(row[key]))
    return dict(out)


def ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
