"""The benchmark scripts: their shared timing/report helpers, and each script's `--quick` smoke run.

The smoke runs take minutes together on 2 shared cores, so they are marked
slow; each must finish well inside its subprocess timeout (a hang fails).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BENCHMARKS, load_benchmark

ROOT = BENCHMARKS.parent
common = load_benchmark("common")


def test_alternate_rotates_the_starting_candidate_and_skips_warmup() -> None:
    order: list[str] = []
    samples = common.alternate({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                               repeats=3, warmup=1, work={"a": 10.0, "b": 20.0})
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(samples[n].seconds) for n in "ab"] == [3, 3]  # the warm-up round is not recorded
    assert samples["b"].work == 20.0 and all(r > 0 for r in samples["b"].rates())


def test_paired_ratios_and_median_range() -> None:
    a, b = common.Samples([1.0, 2.0, 4.0], work=8.0), common.Samples([2.0, 2.0, 2.0], work=8.0)
    assert common.paired_ratios(a, b) == [2.0, 1.0, 0.5]  # rate of a over rate of b, per round
    assert common.paired_ratios(a, b, rate=False) == [0.5, 1.0, 2.0]
    assert common.med_range([3.0, 1.0, 2.0], "{:.1f}") == "2.0 (1.0–3.0)"
    with pytest.raises(ValueError, match="clock"):
        common.alternate({"a": lambda: None}, repeats=1, clock="sundial")


def test_quick_reports_never_go_to_the_committed_results(tmp_path: Path) -> None:
    quick = common.output_dir(argparse.Namespace(quick=True, out=None))
    assert quick.resolve() != common.RESULTS.resolve() and common.RESULTS.resolve() not in quick.resolve().parents
    assert common.output_dir(argparse.Namespace(quick=True, out=tmp_path / "r")) == tmp_path / "r"
    quick.rmdir()


def test_report_records_command_commit_machine_and_load(tmp_path: Path) -> None:
    args = argparse.Namespace(quick=True, repeats=3, warmup=1)
    report = common.Report("demo", "A title", args)
    report.table(["x", "y"], [[1, 2]])
    text = report.write(tmp_path).read_text()
    assert text.startswith("# A title") and "| 1 | 2 |" in text
    for field in ("- command: `python", "- commit:", "- versions: python", "torch", "- machine:", "logical cores",
                  "- load average", "- wall time:", "--quick"):
        assert field in text
    assert "(clean tree)" in text or "(NOT clean:" in text  # whether the code was committed, stated either way


def test_a_committed_report_is_refused_from_a_tree_with_changes(tmp_path: Path, monkeypatch) -> None:
    dirty = common.TreeState("0123456789ab", "?? benchmarks/new_script.py")
    assert not dirty.clean and "NOT clean: 1 uncommitted change" in dirty.describe()
    monkeypatch.setattr(common, "tree_state", lambda: dirty)
    with pytest.raises(SystemExit, match="new_script.py"):
        common.output_dir(argparse.Namespace(quick=False, out=None))
    with pytest.raises(SystemExit, match="refusing"):
        common.output_dir(argparse.Namespace(quick=False, out=common.RESULTS / "sub"))
    assert common.output_dir(argparse.Namespace(quick=False, out=tmp_path / "r")) == tmp_path / "r"  # elsewhere: fine
    quick = common.output_dir(argparse.Namespace(quick=True, out=None))  # a smoke run: a temporary folder
    quick.rmdir()
    clean = common.TreeState("0123456789ab", "")
    monkeypatch.setattr(common, "tree_state", lambda: clean)
    assert clean.clean and clean.describe() == "0123456789ab (clean tree)"
    common.refuse_dirty_results(common.RESULTS)  # a clean tree may write the committed reports


def test_tree_state_sees_untracked_files_but_not_the_reports_themselves() -> None:
    """The real checkout: `git status` lines outside benchmarks/results/ only."""
    state = common.tree_state()
    if state.commit is None:
        pytest.skip("not a git checkout")
    assert all("benchmarks/results/" not in line for line in state.changes.splitlines())


SCRIPTS = {
    "throughput": ["| quick | llmstages / transformers |", "| quick | llmstages recompute=False / transformers |",
                   "matmul 1024×1024", "## What was tried", "| F.rms_norm |", "## Profile of one llmstages step",
                   "| head+loss |"],
    "loss_memory": ["| 8192 | chunked | ", "| 8192 | full | ", "## Agreement", "| met |", "## Time of loss + backward"],
    "packing_throughput": ["## Ratio (labelled tokens/s, documents over none", "| 4 × 256 | none | ", "| 4 × 256 | documents | "],
    "dpo_reference": ["| precompute / live |", "| live | ", "| precompute | "],
    "data_prep": ["## Ratio (MB/s, ours over raw encode_batch", " MB/s"],
    "data_stream": ["## 1. Preparation (tokens/s", "| loader | ", "| 25M training step | ", "## 3. Peak RSS", "| 0.2 GB | "],
    "packed_attention": ["| 256 | alpaca | attention |", "| 512 | long | layer |", "## Peak memory"],
    "cli_step": ["| 32-true | CLI step / bare llmstages step |", "| bf16-mixed | CLI step / bare transformers bf16",
                 "## Where the time goes", "| 32-true CLI |"],
    "real_shape": ["| llmstages / transformers tokens/s |", "| matmul 1024×1024 bf16 (GFLOP/s) |"],
    "bf16": ["| train step (tokens/s) |", "## Profile of one step by operator family", "| matmul |"],
    "demo": ["## Each stage's gain", "| SFT over pretraining: exact match |", "| GRPO over SFT: exact match on GRPO's tasks |",
             "| DPO over SFT: ranks the right answer above SFT's wrong one |", "## Time (seconds)",
             "| whole `llmstages demo` process |", "what each stage learned", "right > SFT's wrong"],
    "demo_tuning": ["SFT models: exact match", "## dpo", "| shipped config | - |", "## grpo", "| group size 16 |"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_run_writes_its_report(name: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / f"{name}.md").read_text()
    for row in SCRIPTS[name]:
        assert row in text, f"{row!r} missing from {name}.md:\n{text}"
    assert "--quick (smoke run, not a result)" in text
    if name == "throughput":
        # litgpt is never installed with the project: its column is skipped with a note
        assert "litgpt not importable" in text or "llmstages / litgpt" in text
