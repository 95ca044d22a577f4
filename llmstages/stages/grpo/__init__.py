"""GRPO, one concept per file: the stage (`stage.py`, the recipe top to bottom), its rollout
(`rollout.py`: sampling, scoring, micro-batches), its rewards (`rewards.py`) and its loss maths
(`loss.py`); the frozen reference is the one DPO uses (`stages/reference.py`)."""

from llmstages.stages.grpo.rollout import MicroBatch, Rollout, sample_completions
from llmstages.stages.grpo.stage import GRPOModule

__all__ = ["GRPOModule", "sample_completions", "Rollout", "MicroBatch"]
