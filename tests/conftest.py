import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("LLMSTAGES_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data under ../shared/data; locally, tests that need it skip when it is absent (with the
    reason); on CI (`CI=true`) they fail instead, so a broken checkout never passes by skipping."""
    if not SHARED_DATA.is_dir():
        reason = f"real data not found at {SHARED_DATA} (../shared/data beside the project)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
        pytest.skip(reason)
    return SHARED_DATA


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the session: the embedded data's default tokenizer (trained once) and token caches."""
    from llmstages.data.base import default_tokenizer

    folder = tmp_path_factory.mktemp("llmstages-cache")
    default_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def cache_dir(cache: Path) -> str:
    return str(cache)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # the suite runs beside other work on 2 cores; oversubscribed OpenMP threads spin
