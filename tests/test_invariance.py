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
