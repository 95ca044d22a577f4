"""GRPO rewards that cannot score a completion (None, NaN, inf), and prompts cut on the left.

A reward function's None / NaN / inf is an error naming the function, the completion, the prompt
and the value (`reward_errors: raise`, the default), or the completion is unscorable
(`reward_errors: exclude`): left out of its group's mean and std and of the loss, counted and
logged. Prompts cut on the left to `max_prompt_len` are counted and logged.
"""

import math
import statistics

import lightning as L
import pytest
import torch

from llmstages.data import PromptData
from llmstages.stages import GRPOModule
from llmstages.stages.grpo.loss import group_advantages
from llmstages.stages.grpo.rewards import Completions, Rewards
from llmstages.stages.grpo.rollout import rollout_stats

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec"),
]

BAD = {"None": None, "NaN": math.nan, "inf": math.inf}
SCORES = [1.0, 0.0, 0.5, 1.0, 0.0, 0.25]  # two prompts of three completions


def completions(n: int = 6, group_size: int = 3) -> Completions:
    return Completions(
        prompts=[f"p{i // group_size}" for i in range(n)], completions=["x"] * n, completion_ids=[[1]] * n,
        stopped=[True] * n, answer=[None] * n, task=[None] * n, prompt_ids=[[0]] * n, max_completion_length=4,
        stop_id=2, group_size=group_size,
    )


BAD_VALUE = {"value": None}  # what `bad_at_4` returns for completion 4 (set by each test)


def bad_at_4(completions, **_):
    """A user reward (by import path) that cannot score completion 4."""
    return [BAD_VALUE["value"] if i == 4 else SCORES[i] for i in range(len(completions))]


BAD_AT_4 = f"{__name__}:bad_at_4"


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_reward_is_an_error_naming_function_completion_prompt_and_value(name, monkeypatch):
    monkeypatch.setitem(BAD_VALUE, "value", BAD[name])
    with pytest.raises(ValueError) as error:
        Rewards(BAD_AT_4)(completions())
    message = str(error.value)
    assert f"{BAD_AT_4!r}" in message and "completion 4" in message and "prompt 1" in message
    assert repr(BAD[name]) in message


@pytest.mark.parametrize("name", list(BAD))
def test_exclude_marks_the_completion_unscorable_and_leaves_it_out_of_its_group(name, monkeypatch):
    monkeypatch.setitem(BAD_VALUE, "value", BAD[name])
    total, per_function = Rewards(["stopped", BAD_AT_4], errors="exclude")(completions())
    assert math.isnan(float(total[4])) and math.isnan(float(per_function[4, 1]))
    assert not bool(total[[0, 1, 2, 3, 5]].isnan().any())
    advantages, zero_std = group_advantages(total, 3, "group")
    # group 2 by hand over its two scorable completions (1 + 1.0, 1 + 0.25); the unscorable one gets 0
    kept = [1 + SCORES[3], 1 + SCORES[5]]
    mean, std = statistics.fmean(kept), statistics.stdev(kept)
    expected = [(kept[0] - mean) / (std + 1e-4), 0.0, (kept[1] - mean) / (std + 1e-4)]
    torch.testing.assert_close(advantages[3:], torch.tensor(expected, dtype=torch.float64))
    first = [1 + s for s in SCORES[:3]]
    m1, s1 = statistics.fmean(first), statistics.stdev(first)
    torch.testing.assert_close(advantages[:3], torch.tensor([(r - m1) / (s1 + 1e-4) for r in first], dtype=torch.float64))
    assert not bool(zero_std.any())


def test_a_group_left_with_one_scorable_completion_has_zero_advantage_not_nan():
    rewards = torch.tensor([1.0, math.nan, math.nan, 0.0, 1.0, 0.5], dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        advantages, zero_std = group_advantages(rewards, 3, scale)
        assert not bool(advantages.isnan().any())
        assert advantages[:3].tolist() == [0.0, 0.0, 0.0] and zero_std.tolist() == [True, False]


def test_rollout_stats_count_unscorable_and_average_only_what_was_scored():
    rewards = torch.tensor([1.0, math.nan, 0.0, 0.5], dtype=torch.float64)
    per_function = rewards[:, None]
    stats = rollout_stats(rewards, per_function, ["f"], 2, [[1], [1, 2], [1], [1]], [True] * 4,
                          torch.tensor([False, False]), 0.0)
    assert stats["unscorable"] == 1.0
    assert stats["reward"] == pytest.approx(0.5) and stats["rewards/f"] == pytest.approx(0.5)  # the two agree


# --------------------------------------------------------------------------- through a run


def none_for_odd_completions(completion_ids, **_):
    """A user reward that cannot score every other completion."""
    return [None if i % 2 else float(len(ids)) for i, ids in enumerate(completion_ids)]


class Logged(L.Callback):
    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})


def run_one_step(cache_dir: str, max_prompt_len: int = 64, **module_kwargs) -> dict[str, float]:
    data = PromptData(cache_dir=cache_dir, batch_size=2, shuffle=False, num_prompts=4, val_fraction=0.0,
                      max_prompt_len=max_prompt_len)
    data.setup("fit")
    module = GRPOModule(vocab_size=data.vocab_size, preset="tiny", group_size=2, max_completion_length=4,
                        **{"reward": f"{__name__}:none_for_odd_completions", **module_kwargs})
    logged = Logged()
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, max_steps=1,
              callbacks=[logged]).fit(module, data)
    return logged.metrics


def test_a_run_stops_on_a_none_reward_by_default(cache_dir):
    with pytest.raises(ValueError, match=r"none_for_odd_completions.*returned None for completion 1 \(prompt 0"):
        run_one_step(cache_dir)


def test_a_run_with_exclude_trains_on_the_scorable_completions_and_logs_the_rest(cache_dir):
    metrics = run_one_step(cache_dir, reward_errors="exclude")
    assert metrics["train/unscorable"] == 2.0  # completions 1 and 3 of the step's 4
    assert math.isfinite(metrics["train/reward"]) and math.isfinite(metrics["train/loss"])
    assert metrics["train/reward"] == pytest.approx(metrics["train/rewards/none_for_odd_completions"])


def test_prompts_cut_on_the_left_are_counted_and_logged(cache_dir):
    data = PromptData(cache_dir=cache_dir, batch_size=2, shuffle=False, num_prompts=4, val_fraction=0.0, max_prompt_len=8)
    data.setup("fit")
    lengths = [len(item["prompt_ids"]) for item in data.train_set]
    assert data.truncated == 4 and lengths == [8] * 4  # every embedded prompt is longer than 8 tokens
    assert data.collate([data.train_set[0], data.train_set[1]])["truncated"] == [True, True]
    metrics = run_one_step(cache_dir, max_prompt_len=8, reward="stopped")
    assert metrics["train/prompts_left_truncated"] == 2.0  # the step's two prompts
    metrics = run_one_step(cache_dir, max_prompt_len=256, reward="stopped")
    assert metrics["train/prompts_left_truncated"] == 0.0
