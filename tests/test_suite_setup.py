"""The suite itself: on CI a missing ../shared/data fails the tests that need it; locally they skip, saying why."""

import subprocess
import sys
from pathlib import Path

import pytest

from clirun import env

ROOT = Path(__file__).resolve().parents[1]
NEEDS_DATA = "tests/test_cli.py::test_tokenizer_train_command"  # uses the shared_data fixture


@pytest.mark.parametrize("ci, outcome, code", [("true", "1 error", 1), ("", "1 skipped", 0)])
def test_missing_shared_data_fails_on_ci_and_skips_locally(tmp_path, ci, outcome, code):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", NEEDS_DATA],
        cwd=ROOT, env={**env(CI=ci), "LLMSTAGES_SHARED_DATA": str(tmp_path / "missing")},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == code and outcome in result.stdout, result.stdout[-2000:]  # fixture failure = error
    assert f"real data not found at {tmp_path / 'missing'}" in result.stdout
