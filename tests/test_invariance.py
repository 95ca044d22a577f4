"""The trajectory invariance suite: its comparison logic by hand, and `--quick` end to end (real runs, real controls)."""

import json
from pathlib import Path

import pytest

from helpers import load_benchmark



@pytest.fixture(scope="module")
def invariance():
    return load_benchmark("invariance")


def test_max_relative_and_missing_steps(invariance) -> None:
    worst, per_step = invariance.max_relative({0: 1.0, 1: 2.2}, {0: 1.0, 1: 2.0}, [0, 1])
    assert per_step[0] == 0.0 and worst == pytest.approx(0.1)
    assert invariance.max_relative({0: 1.0}, {0: 1.0, 1: 2.0}, [0, 1])[0] == float("inf")  # a step never logged fails
    # a reference that is zero by construction is compared absolutely (against the floor), not by its float noise
    assert invariance.max_relative({0: 3e-9}, {0: 1e-9}, [0])[0] == pytest.approx(2e-9 / invariance.SCALE_FLOOR)
    assert invariance.max_relative({0: 0.5}, {0: 1e-9}, [0])[0] > 10


def test_a_cell_shows_the_case_furthest_from_its_tolerance(invariance) -> None:
    close = {"loss": 5e-6, "grad_norm": 1e-5, "tolerance": (1e-5, 1e-4)}
    loose = {"loss": 5e-5, "grad_norm": 1e-4, "tolerance": (1e-4, 1e-3)}  # further in absolute terms, not relative
    far = {"loss": 1e-6, "grad_norm": 9e-5, "tolerance": (1e-5, 1e-4)}
    assert invariance.worst([close, loose, far]) is far


def test_a_control_must_fail_widely(invariance) -> None:
    base = {"tolerance": (1e-5, 1e-4)}
    assert invariance.fails_widely({**base, "loss": 1e-3, "grad_norm": 0.0})
    assert not invariance.fails_widely({**base, "loss": 5e-5, "grad_norm": 5e-4})  # outside, but not by 10x


def test_quick_suite_holds_every_class_and_catches_every_control(invariance, tmp_path: Path) -> None:
    """Real runs through the console entry point: equal classes within tolerance, controls outside by >= 10x.
    A change that breaks exact normalisation anywhere in SFT or DPO fails here."""
    code = invariance.main(["--quick", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "invariance.json").read_text())
    assert code == 0, [(r["stage"], r["class"], r["control"], r["loss"], r["grad_norm"]) for r in results]
    assert {(r["stage"], r["class"]) for r in results if not r["control"]} == {
        ("sft", "batch_split"), ("sft", "resume"), ("dpo", "batch_split"), ("dpo", "resume")
    }
    assert all(r["within"] for r in results if not r["control"])
    assert sum(r["control"] for r in results) == 2 and all(invariance.fails_widely(r) for r in results if r["control"])
    assert "❌" not in (tmp_path / "invariance.md").read_text().split("## Negative controls")[0]


@pytest.mark.slow
def test_full_suite_holds_every_class_of_every_stage(invariance, tmp_path: Path) -> None:
    """What benchmarks/results/invariance.md reports: every stage, every class, 30 steps (about half an hour)."""
    assert invariance.main(["--out", str(tmp_path)]) == 0
