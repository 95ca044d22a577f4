"""A run's folder, checkpoint location, logger settings and resume point, decided in one pure function.

Design choices (LitGPT's `out_dir` + `init_out_dir`, as one decision):
- `plan_run(request, on_disk, env)` is pure: the parsed configuration (`RunRequest`), what
  is on disk (`OnDisk`, read by `survey`) and the environment in, a `RunPlan` out. The CLI
  applies it (claims the folder, fills in the config, records `run.json`); the decision
  can be tested without LightningCLI, and nothing is decided twice.
- One run, one folder: `<root>/<stage>/<run name>/`. A new run's folder is claimed by
  rank 0 only (`RunPlan.claim`); a process Lightning spawns for another rank inherits
  rank 0's choice (`RUN_DIR_ENV`); another rank under torchrun/srun creates nothing
  (ModelCheckpoint broadcasts rank 0's folder at set-up).
- Loggers are recognised by type (`issubclass` of the resolved class), never by a
  substring of their class path; a logger or ModelCheckpoint with an explicit
  `save_dir`/`dirpath` is left where it is.
- `ckpt_path` keeps Lightning's meanings: `last` is the `last*.ckpt` of the checkpoint
  callbacks' folders (the run folder's `checkpoints/`, or an explicit `dirpath`), and
  when there is none yet the run starts from scratch with a warning (Lightning's
  "set and forget"); more than one candidate is an error that lists them (Lightning
  would silently take the newest). `hpc` is the run folder's `hpc_ckpt_<max>.ckpt`.
  `best` is Lightning's. Any other value is a file; a run's own checkpoint continues
  that run.
- A SLURM job requeued after preemption (`SLURM_RESTART_COUNT` > 0) with no
  `--ckpt_path` continues the unfinished run that job started (its id is in
  `run.json`), from that run's newest `last`/`hpc` checkpoint: Lightning's SLURM
  auto-resume, with the run folder found again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from llmstages.errors import UserError

RUN_DIR_ENV = "LLMSTAGES_RUN_DIR"
DEFAULT_ROOT = "runs"
LATEST = "latest"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
# Lightning's ModelCheckpoint._find_last_checkpoints: a .ckpt whose stem *starts* with this (last-v1.ckpt too)
LAST_PATTERN = re.compile(r"^last.*\.ckpt$")
HPC_PATTERN = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")  # Lightning's hpc_save_path


class RunFolderError(UserError, ValueError):
    """No run folder or resume point can be chosen (a taken --run_name, an ambiguous `last`)."""


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class LoggerSpec:
    """One configured logger: its resolved class and the settings the run folder may fill in."""

    cls: type | None
    save_dir: str | None = None
    name: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class RunRequest:
    """What the parsed configuration asks for."""

    stage: str
    subcommand: str = "fit"
    root: str | None = None  # trainer.default_root_dir
    run_name: str | None = None
    ckpt_path: str | None = None
    loggers: tuple[LoggerSpec, ...] = ()
    logger_disabled: bool = False  # trainer.logger false/null
    checkpoint_dirs: tuple[str | None, ...] = ()  # each ModelCheckpoint's dirpath (None: the run folder's)
    rank: int = 0
    new_run_name: str = "run"  # the start time, for a run without --run_name
    new_wandb_id: str = "run"  # a fresh W&B id, used when neither the config nor run.json has one

    @property
    def stage_root(self) -> Path:
        return Path(self.root or DEFAULT_ROOT) / self.stage


@dataclass(frozen=True)
class RunOnDisk:
    """One existing run folder."""

    last: Mapping[str, float] = field(default_factory=dict)  # checkpoints/last*.ckpt -> mtime
    hpc: Mapping[str, float] = field(default_factory=dict)  # hpc_ckpt_<n>.ckpt -> mtime
    info: Mapping = field(default_factory=dict)  # run.json
    is_link: bool = False


@dataclass(frozen=True)
class OnDisk:
    """What `plan_run` needs to know about the filesystem (read by `survey`)."""

    runs: Mapping[str, RunOnDisk] = field(default_factory=dict)  # run name -> folder under the stage root
    explicit_last: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # explicit dirpath -> its last*.ckpt
    dir_runs: Mapping[str, str | None] = field(default_factory=dict)  # a checkpoint folder -> the run folder it is in
    checkpoint_run: str | None = None  # the run folder an explicit ckpt_path file belongs to


# ----------------------------------------------------------------------------- output


@dataclass(frozen=True)
class LoggerSettings:
    """What to set on one configured logger (None: leave as configured)."""

    save_dir: str | None = None
    name: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class RunPlan:
    request: RunRequest
    run_dir: Path
    claim: bool  # this process must create run_dir (exclusively) before anything else
    record: bool  # this process writes run.json (rank 0, not an inherited folder)
    ckpt_path: str | None
    timestamped: bool = False  # run_dir is named after the start time: a taken name gets a suffix, not an error
    wandb_id: str | None = None
    warnings: tuple[str, ...] = ()

    def moved_to(self, run_dir: Path) -> RunPlan:
        """The same plan in the folder actually claimed (a taken start-time name gets a `-2` suffix)."""
        return replace(self, run_dir=Path(run_dir))

    @property
    def checkpoint_dirs(self) -> tuple[Path, ...]:
        """Each ModelCheckpoint's folder: its explicit dirpath, else `<run>/checkpoints`."""
        return tuple(Path(d) if d is not None else self.run_dir / CHECKPOINTS for d in self.request.checkpoint_dirs)

    @property
    def checkpoint_dir(self) -> Path:
        """Where this run's `last.ckpt` goes (the first ModelCheckpoint's folder; a preemption save too)."""
        return (self.checkpoint_dirs or (self.run_dir / CHECKPOINTS,))[0]

    @property
    def loggers(self) -> tuple[LoggerSettings, ...]:
        return tuple(_logger_settings(spec, self.run_dir, self.request.stage, self.wandb_id) for spec in self.request.loggers)

    @property
    def config_dir(self) -> Path | None:
        """Where config.yaml goes: the run folder, unless a logger has its own save_dir (then the trainer's log_dir)."""
        if self.request.logger_disabled or all(spec.save_dir is None for spec in self.request.loggers):
            return self.run_dir
        return None


def _logger_settings(spec: LoggerSpec, run_dir: Path, stage: str, wandb_id: str | None) -> LoggerSettings:
    if spec.save_dir is not None or spec.cls is None:
        return LoggerSettings()
    cls = spec.cls
    if issubclass(cls, WandbLogger):
        return LoggerSettings(save_dir=str(run_dir), name=f"{spec.name or stage}/{run_dir.name}", id=wandb_id)
    if issubclass(cls, CSVLogger):
        return LoggerSettings(save_dir=str(run_dir), name="csv")  # <run>/csv/version_<n>/
    if issubclass(cls, TensorBoardLogger):
        return LoggerSettings(save_dir=str(run_dir), name="tensorboard")
    return LoggerSettings(save_dir=str(run_dir))


# ----------------------------------------------------------------------------- the decision


def plan_run(request: RunRequest, on_disk: OnDisk, env: Mapping[str, str]) -> RunPlan:
    """The run's folder and resume point; raises RunFolderError when none can be chosen."""
    fit = request.subcommand == "fit"
    ckpt_path, warnings = request.ckpt_path, []
    continued: Path | None = None  # an existing (or named) run this fit continues

    if ckpt_path == "last":
        run_name, ckpt_path, note = _resolve_last(request, on_disk)
        warnings += [note] if note else []
        if run_name is not None:
            continued = request.stage_root / run_name
        elif ckpt_path is not None and on_disk.dir_runs.get(str(Path(ckpt_path).parent)):
            continued = Path(on_disk.dir_runs[str(Path(ckpt_path).parent)])
    elif ckpt_path == "hpc":
        run_name, ckpt_path = _resolve_hpc(request, on_disk)
        continued = request.stage_root / run_name
    elif ckpt_path is None and fit and (requeued := _requeued_run(on_disk, env)) is not None:
        run_name, ckpt_path = requeued
        continued = request.stage_root / run_name
        warnings.append(f"SLURM job {slurm_job(env)} requeued: continuing run {run_name}"
                        + (f" from {ckpt_path}" if ckpt_path else " from scratch (it saved no checkpoint)"))
    elif ckpt_path and ckpt_path != "best" and on_disk.checkpoint_run is not None:
        continued = Path(on_disk.checkpoint_run)  # resuming a run's own checkpoint continues that run

    claim = timestamped = False
    if env.get(RUN_DIR_ENV):  # a process Lightning spawned for another rank: rank 0 chose the folder
        run_dir = Path(env[RUN_DIR_ENV])
    elif fit and continued is not None:
        run_dir = continued
        new = request.ckpt_path == "last" and continued.parent == request.stage_root and continued.name not in on_disk.runs
        claim = request.rank == 0 and new  # `last` naming a run that saved nothing yet: Lightning starts from scratch
    elif request.rank == 0:
        prefix = "" if fit else f"{request.subcommand}-"  # a validate run never looks like a fit
        run_dir, claim = request.stage_root / (request.run_name or prefix + request.new_run_name), True
        timestamped = request.run_name is None
    else:  # another rank under torchrun/srun: never creates anything; ModelCheckpoint broadcasts rank 0's folder
        run_dir = request.stage_root / (request.run_name or f"pending-rank{request.rank}")

    info = on_disk.runs[run_dir.name].info if run_dir.parent == request.stage_root and run_dir.name in on_disk.runs else {}
    configured = [s.id for s in request.loggers if s.cls is not None and issubclass(s.cls, WandbLogger) and s.id]
    wandb_id = (configured or [None])[0] or info.get("wandb_id") or request.new_wandb_id
    return RunPlan(request=request, run_dir=run_dir, claim=claim, timestamped=timestamped, record=request.rank == 0 and not env.get(RUN_DIR_ENV),
                   ckpt_path=ckpt_path, wandb_id=wandb_id, warnings=tuple(warnings))


def _uses_run_folder(request: RunRequest) -> bool:
    return not request.checkpoint_dirs or any(d is None for d in request.checkpoint_dirs)


def _newest(files: Mapping[str, float]) -> str:
    return max(files, key=lambda p: files[p])


def _resolve_last(request: RunRequest, on_disk: OnDisk) -> tuple[str | None, str | None, str | None]:
    """(run name to continue, checkpoint file, warning) for `--ckpt_path last`."""
    run_name, candidates = request.run_name, {}
    if _uses_run_folder(request):
        if run_name is None:
            resumable = {name: run for name, run in on_disk.runs.items() if run.last and not run.is_link}
            if resumable:
                run_name = max(resumable, key=lambda name: max(resumable[name].last.values()))
        if run_name is not None:
            candidates.update(on_disk.runs.get(run_name, RunOnDisk()).last)
    for dirpath in request.checkpoint_dirs:
        if dirpath is not None:
            candidates.update(on_disk.explicit_last.get(dirpath, {}))
    if len(candidates) > 1:
        listed = "\n  ".join(sorted(candidates, key=lambda p: candidates[p]))
        raise RunFolderError(
            f"--ckpt_path last is ambiguous: {len(candidates)} last checkpoints (oldest first):\n  {listed}\n"
            "pass the one to resume as --ckpt_path <file>"
        )
    if not candidates:
        where = ", ".join(str(d) for d in request.checkpoint_dirs if d is not None)
        if _uses_run_folder(request):
            folder = request.stage_root / run_name if run_name else request.stage_root / "*"
            where = f"{folder}/{CHECKPOINTS}" + (f", {where}" if where else "")
        return run_name, None, (f"--ckpt_path last: no last checkpoint in {where} yet; "
                                "this run starts from scratch (Lightning's `last` when nothing was saved)")
    path = next(iter(candidates))
    if run_name is None:  # found in an explicit dirpath: continue the run it belongs to, if any
        return None, path, None
    return run_name, path, None


def _resolve_hpc(request: RunRequest, on_disk: OnDisk) -> tuple[str, str]:
    """`--ckpt_path hpc`: the run folder's hpc_ckpt with the highest number (Lightning's default_root_dir)."""
    run_name = request.run_name
    if run_name is None:
        with_hpc = {name: run for name, run in on_disk.runs.items() if run.hpc and not run.is_link}
        run_name = max(with_hpc, key=lambda name: max(with_hpc[name].hpc.values())) if with_hpc else None
    files = on_disk.runs.get(run_name, RunOnDisk()).hpc if run_name else {}
    if not files:
        where = request.stage_root / (run_name or "*")
        raise RunFolderError(f"--ckpt_path hpc: no hpc_ckpt_<n>.ckpt in {where}")
    return run_name, max(files, key=lambda p: int(HPC_PATTERN.match(Path(p).name).group(1)))


def slurm_job(env: Mapping[str, str]) -> str | None:
    """This process's SLURM job (`<array job>_<task>` for an array task), recorded in run.json."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def _requeued_run(on_disk: OnDisk, env: Mapping[str, str]) -> tuple[str, str | None] | None:
    job = slurm_job(env)
    if not job or int(env.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    mine = {name: run for name, run in on_disk.runs.items()
            if not run.is_link and str(run.info.get("slurm_job_id")) == job and run.info.get("status") != "finished"}
    if not mine:
        return None
    name = max(mine, key=lambda n: str(mine[n].info.get("started", "")))
    files = {**mine[name].last, **mine[name].hpc}
    return name, (_newest(files) if files else None)


# ----------------------------------------------------------------------------- reading the disk


def survey(request: RunRequest, checkpoint_file: str | None = None) -> OnDisk:
    """The facts `plan_run` decides from: the stage's run folders, the explicit dirpaths' last checkpoints."""
    import json

    runs = {}
    root = request.stage_root
    if root.is_dir():
        for folder in root.iterdir():
            if folder.name.startswith(".") or folder.name == LATEST or not folder.is_dir():
                continue
            try:
                info = json.loads((folder / RUN_FILE).read_text())
            except (OSError, ValueError):
                info = {}
            runs[folder.name] = RunOnDisk(
                last=_matching(folder / CHECKPOINTS, LAST_PATTERN), hpc=_matching(folder, HPC_PATTERN),
                info=info, is_link=folder.is_symlink(),
            )
    explicit = {d: _matching(Path(d), LAST_PATTERN) for d in request.checkpoint_dirs if d is not None}
    dir_runs = {str(Path(p).parent): _run_of(Path(p)) for files in explicit.values() for p in files}
    checkpoint_run = None
    if checkpoint_file and checkpoint_file not in ("last", "best", "hpc"):
        checkpoint_run = _run_of(Path(checkpoint_file))
    return OnDisk(runs=runs, explicit_last=explicit, dir_runs=dir_runs, checkpoint_run=checkpoint_run)


def _run_of(checkpoint: Path) -> str | None:
    """The run folder a checkpoint file belongs to (`<run>/checkpoints/x.ckpt`), if it is one."""
    run = checkpoint.resolve().parent.parent
    return str(run) if (run / RUN_FILE).exists() else None


def _matching(folder: Path, pattern: re.Pattern) -> dict[str, float]:
    if not folder.is_dir():
        return {}
    out = {}
    for path in folder.iterdir():
        if pattern.match(path.name):
            try:
                out[str(path)] = path.stat().st_mtime
            except OSError:
                continue
    return out
