"""Run folders and checkpoint files you can trust.

Design choices:
- One run, one folder: `<root>/<stage>/<run name>/` (root: `trainer.default_root_dir`,
  else `runs`; run name: `--run_name`, else the start time, `-2`, `-3`... when taken).
  The folder is claimed with an exclusive `mkdir`, so concurrent runs of one config can
  never share it. It holds `run.json` (stage, status, W&B id), `config.yaml`,
  `checkpoints/`, the loggers' files.
- `<root>/<stage>/latest` is a relative symlink to the newest *finished* run of the
  stage, replaced atomically (a new link renamed over the old one) when a fit ends
  normally; a killed or failed run never becomes `latest`. The next stage chains from
  `runs/<stage>/latest/checkpoints/last.ckpt`.
- Checkpoints are written to a hidden temporary file in the destination folder
  (never `$TMPDIR`: a rename is only atomic within one filesystem), flushed, fsynced
  and renamed over the final name; a kill mid-write leaves the previous file intact
  and at most a temporary file, removed by the next save into that folder once its
  writer is gone. A write that fails (a full disk, an unwritable folder) raises
  `CheckpointError` naming the file and the cause; the previous file stays. A
  checkpoint holding a non-finite tensor is refused.
- A checkpoint that cannot be read raises `CheckpointError` naming its path and what
  is wrong (missing, truncated, not a checkpoint), checked before any data is built.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

# reading a checkpoint file is the model layer's (model.checkpoint); re-exported for the run code
from llmstages.model.checkpoint import (  # noqa: F401
    CheckpointError,
    check_checkpoint_file,
    check_init_from,
    load_checkpoint_file,
)
from llmstages.run_plan import LATEST, RUN_FILE, RunFolderError  # noqa: F401 - part of this module's API too

_TMP_MARK = ".tmp-"


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint write that failed (a full disk, an unwritable folder): still the OSError it was."""


# ----------------------------------------------------------------------------- checkpoint files


def first_nonfinite(checkpoint: dict) -> str | None:
    """The name of the first floating tensor of `state_dict` holding a NaN or infinity, else None."""
    for name, tensor in (checkpoint.get("state_dict") or {}).items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if local.numel() and not bool(torch.isfinite(local).all()):
                return name
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete checkpoint temporaries in `folder` whose writer (this host, that pid) is gone."""
    removed, host = [], socket.gethostname()
    for tmp in folder.glob(f".*{_TMP_MARK}*"):
        try:
            writer_host, pid = tmp.name.rsplit(_TMP_MARK, 1)[1].rsplit("-", 1)
            if writer_host == host and not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        except (ValueError, OSError):
            continue
    return removed


def atomic_save(checkpoint: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside `path`, fsync, rename: `path` is the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{socket.gethostname()}-{os.getpid()}")
    writer = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        with open(tmp, "wb") as handle:
            writer = _ErrorRecordingFile(handle)
            torch.save(checkpoint, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # a read-only filesystem refuses even this
            tmp.unlink(missing_ok=True)
        cause = err if isinstance(err, OSError) else getattr(writer, "error", None)
        if cause is not None:  # torch's zip writer reports a failed write as "unexpected pos": name the real cause
            kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {cause.strerror or cause}; {kept}") from err
        raise
    _fsync_dir(path.parent)


class _ErrorRecordingFile:
    """A binary file for torch.save that remembers the OSError of a failed write (full disk, I/O error)."""

    def __init__(self, handle) -> None:
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        try:
            self.handle.flush()
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name):
        return getattr(self.handle, name)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O, made atomic, finite-only, and explicit about bad files."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        bad = first_nonfinite(checkpoint)
        if bad is not None:
            raise CheckpointError(f"refusing to write {path}: weight {bad} is not finite (NaN or infinity)")
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path)  # remote storage: fsspec's own semantics
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None) -> dict:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_checkpoint_file(path, map_location=map_location, weights_only=bool(weights_only))


# ----------------------------------------------------------------------------- run folders


def stage_name(class_path: str) -> str:
    """`llmstages.stages.SFTModule` -> `sft`: the folder a stage's runs live in."""
    name = class_path.rsplit(".", 1)[-1]
    if name.endswith("Module") and len(name) > len("Module"):
        name = name[: -len("Module")]
    return name.lower()


def claim_run_dir(stage_root: Path, run_name: str | None, prefix: str = "") -> Path:
    """Create and return a new run folder under `stage_root`; never one another run holds.

    An explicit `run_name` that exists is an error (pass `--ckpt_path last` to continue it).
    """
    stage_root.mkdir(parents=True, exist_ok=True)
    if run_name is not None:
        if run_name in ("", ".", "..", LATEST) or "/" in run_name:
            raise RunFolderError(f"--run_name {run_name!r}: use a plain folder name other than {LATEST!r}")
        path = stage_root / run_name
        try:
            path.mkdir()
        except FileExistsError:
            raise RunFolderError(
                f"run folder {path} already exists: choose another --run_name, or continue it with --ckpt_path last"
            ) from None
        return path
    base = prefix + time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        path = stage_root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name under {stage_root}")


def find_resumable_run(stage_root: Path, run_name: str | None) -> Path:
    """The run `--ckpt_path last` continues: `run_name`'s folder, else the run whose last.ckpt is newest."""
    if run_name is not None:
        path = stage_root / run_name
        if not (path / "checkpoints" / "last.ckpt").exists():
            raise RunFolderError(f"--ckpt_path last --run_name {run_name}: {path}/checkpoints/last.ckpt does not exist")
        return path
    candidates = [
        p for p in stage_root.glob("*/checkpoints/last.ckpt") if not p.parent.parent.is_symlink()
    ] if stage_root.is_dir() else []
    if not candidates:
        raise RunFolderError(
            f"--ckpt_path last: no run under {stage_root} has checkpoints/last.ckpt "
            "(set --trainer.default_root_dir or --run_name to point at the run to continue)"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime).parent.parent


def run_of_checkpoint(ckpt: Path) -> Path | None:
    """The run folder a checkpoint file belongs to (`<run>/checkpoints/x.ckpt`), if it is one."""
    run = ckpt.resolve().parent.parent
    return run if (run / RUN_FILE).exists() else None


def read_run_info(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / RUN_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_run_info(run_dir: Path, clear: tuple[str, ...] = (), **fields) -> dict:
    """Merge `fields` into `run.json`, atomically; `clear` names fields to drop (a resumed run's stale error)."""
    info = {k: v for k, v in read_run_info(run_dir).items() if k not in clear}
    info.update(fields)
    tmp = run_dir / f".{RUN_FILE}{_TMP_MARK}{socket.gethostname()}-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
    os.replace(tmp, run_dir / RUN_FILE)
    return info


def mark_latest(run_dir: Path) -> Path:
    """Point `<stage root>/latest` at `run_dir`, atomically (rename of a fresh symlink)."""
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}{_TMP_MARK}{socket.gethostname()}-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)
    return link
