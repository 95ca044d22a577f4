"""The training stages, one LightningModule each, on one backbone."""

from llmstages.stages.base import LMStage, StageModule, Weighted
from llmstages.stages.dpo import DPOModule
from llmstages.stages.grpo import GRPOModule
from llmstages.stages.kto import KTOModule
from llmstages.stages.orpo import ORPOModule
from llmstages.stages.pretrain import PretrainModule
from llmstages.stages.reward import RewardModule
from llmstages.stages.sft import SFTModule

__all__ = ["StageModule", "LMStage", "Weighted", "PretrainModule", "SFTModule", "RewardModule", "DPOModule", "GRPOModule",
           "ORPOModule", "KTOModule"]
