"""Shared pieces of the benchmark scripts: side-by-side timing and the report.

Design choices:
- Every comparison is measured side by side in one process: `alternate`
  runs the candidates round-robin (the starting candidate rotates every
  round, so slow drift of a shared machine hits all of them alike), after
  warm-up rounds that are not recorded. Ratios are taken per round (A and B
  timed seconds apart) and summarised by their median and min-max; absolute
  numbers are context only.
- A report is Markdown with everything needed to judge and rerun it: the
  exact command, the commit and whether the tree was clean (`git status`,
  untracked files included, the reports folder excluded), library versions,
  CPU model, cores, threads, load average before and after, wall time.
- A committed report comes from committed code: writing into
  `benchmarks/results/` from a tree with uncommitted changes is refused
  (`output_dir`). `--quick` runs write to a temporary folder unless `--out`
  is given, so a smoke run never overwrites a committed report; an explicit
  `--out` elsewhere is always allowed.
- The scripts are modules of the `benchmarks` package, run from the
  repository root: `python -m benchmarks.<name>`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"


def data_files(path: Path, embedded: str) -> tuple[list[str] | None, str]:
    """(files for a data module, what the report names as the source): `path` when it exists,
    else None (the embedded data, described by `embedded`)."""
    if path.is_file():
        return [str(path)], str(path)
    return None, f"{embedded} (real data not found)"


# --------------------------------------------------------------------------- timing


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Samples:
    """Seconds per round for one candidate, plus what one round processed (tokens, MB, ...)."""

    seconds: list[float] = field(default_factory=list)
    work: float = 1.0  # units processed per timed round, for rates

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def rates(self) -> list[float]:
        return [self.work / s for s in self.seconds]


def alternate(
    candidates: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 1,
    work: dict[str, float] | float = 1.0,
    sync: Callable[[], None] | None = None,
    clock: str = "wall",
) -> dict[str, Samples]:
    """Time each candidate `repeats` times, round-robin, after `warmup` unrecorded rounds.

    Round r starts with candidate r mod n. `sync` (e.g. `torch.cuda.synchronize`)
    runs before each clock read so asynchronous devices are timed honestly.
    `clock="cpu"` reads this process's CPU time instead of the wall clock:
    on cores shared with other work it leaves out the time spent descheduled
    (meaningful with one torch thread, where no thread spins waiting for another).
    """
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; choose one of: {', '.join(CLOCKS)}")
    now = CLOCKS[clock]
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(candidates)
    out = {name: Samples(work=work[name] if isinstance(work, dict) else work) for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if sync:
                sync()
            start = now()
            candidates[name]()
            if sync:
                sync()
            elapsed = now() - start
            if round_index >= warmup:
                out[name].seconds.append(elapsed)
    return out


def paired_ratios(numerator: Samples, denominator: Samples, *, rate: bool = True) -> list[float]:
    """Per-round ratios: rate(numerator) / rate(denominator) (or time / time with rate=False)."""
    pairs = zip(numerator.seconds, denominator.seconds)
    if rate:
        return [(numerator.work / a) / (denominator.work / b) for a, b in pairs]
    return [a / b for a, b in pairs]


def med_range(values: Sequence[float], fmt: str = "{:.3g}") -> str:
    """`median (min-max)` of the values."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


# --------------------------------------------------------------------------- command line


def base_parser(description: str, default_repeats: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (CI smoke run, < 2 min)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default: benchmarks/results; a temporary folder with --quick)")
    parser.add_argument("--repeats", type=int, default=default_repeats, help="timed rounds per candidate")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded rounds before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    return parser


def output_dir(args: argparse.Namespace) -> Path:
    """Where the report goes; refuses the committed results folder from a tree with uncommitted changes."""
    if args.out is not None:
        out = args.out
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="llmstages-bench-"))
    else:
        out = RESULTS
    refuse_dirty_results(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def refuse_dirty_results(out: Path) -> None:
    """SystemExit when `out` is (inside) `benchmarks/results/` and the code tree is not clean."""
    out = Path(out).resolve()
    if out != RESULTS.resolve() and RESULTS.resolve() not in out.parents:
        return
    state = tree_state()
    if not state.clean:
        raise SystemExit(
            f"refusing to write a committed report into {RESULTS} from a tree that is not clean "
            f"({state.describe()}):\n{state.changes}\ncommit first, or pass --out elsewhere / --quick"
        )


# --------------------------------------------------------------------------- machine and versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class TreeState:
    """The commit and `git status` of the checkout the benchmark runs from."""

    commit: str | None  # None: not a git checkout
    changes: str  # `git status --porcelain` lines outside benchmarks/results/ ("" when clean)

    @property
    def clean(self) -> bool:
        return self.commit is not None and not self.changes

    def describe(self) -> str:
        if self.commit is None:
            return "unknown (not a git checkout)"
        if self.clean:
            return f"{self.commit} (clean tree)"
        return f"{self.commit} (NOT clean: {len(self.changes.splitlines())} uncommitted change(s))"


def tree_state() -> TreeState:
    """Reports themselves are excluded: a run writing several reports stays clean between them."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=all", "--", ".",
                      f":(exclude){RESULTS.relative_to(ROOT)}")
    except (OSError, subprocess.CalledProcessError, ValueError):
        return TreeState(None, "")
    return TreeState(commit, changes)


def git_commit() -> str:
    """The commit and whether the tree was clean, as a report line states it."""
    return tree_state().describe()


def command_line() -> str:
    """How this run was started: `python -m benchmarks.<module> ...` for the package's scripts."""
    script = Path(sys.argv[0]).resolve()
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    if script.suffix == ".py" and (ROOT / "benchmarks") in script.parents:
        parts = script.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__main__" else parts)
        return f"python -m {module} {args}".strip()
    return f"python {shlex.quote(os.path.relpath(script, ROOT))} {args}".strip()


def versions(extra: Sequence[str] = ()) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "lightning", "transformers", "tokenizers", "numpy", *extra):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            module = sys.modules.get(name)
            out[name] = getattr(module, "__version__", "not installed") if module else "not installed"
    return out


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unavailable"


# --------------------------------------------------------------------------- report


class Report:
    """A Markdown report, written to `<out>/<name>.md`, with the run's provenance."""

    def __init__(self, name: str, title: str, args: argparse.Namespace, extra_versions: Sequence[str] = ()) -> None:
        self.name, self.title, self.args = name, title, args
        self.extra_versions = list(extra_versions)
        self.started = time.time()
        self.load_before = load_average()
        self.commit = git_commit()  # at the start: the code that ran, not what was checked out when it ended
        self.parts: list[str] = []

    def text(self, markdown: str) -> None:
        self.parts.append(markdown.strip() + "\n")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        self.parts.append("\n".join(lines) + "\n")

    def provenance(self) -> str:
        import torch

        lines = [
            f"- command: `{command_line()}`",
            f"- commit: {self.commit}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in versions(self.extra_versions).items()),
            f"- machine: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
            f"- load average (1/5/15 min) before: {self.load_before}; after: {load_average()}"
            " (the cores are shared with other work: compare ratios, not absolute numbers)",
            f"- wall time: {time.time() - self.started:.0f} s",
            f"- mode: {'--quick (smoke run, not a result)' if self.args.quick else 'full'}"
            f", repeats {self.args.repeats}, warm-up rounds {self.args.warmup}",
        ]
        if torch.cuda.is_available():
            lines.append(f"- device: {torch.cuda.get_device_name()}")
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> Path:
        body = [f"# {self.title}\n", *self.parts, "## Run\n", self.provenance()]
        path = out / f"{self.name}.md"
        path.write_text("\n".join(body))
        print(f"report: {path}")
        return path


def set_threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
