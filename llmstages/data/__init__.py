"""Tokens in, batches out: one LightningDataModule per stage family.

`llmstages.data.SFTData` in a config is the class in `data/sft.py`; the batch
contract every module yields is documented in `data/batch.py`.
"""

from llmstages.data.base import StageData
from llmstages.data.kto import KTOData
from llmstages.data.preference import PreferenceData
from llmstages.data.pretrain import PretrainData
from llmstages.data.prompts import PromptData
from llmstages.data.sft import SFTData
from llmstages.data.shards.streaming import StreamingPretrainData

__all__ = ["StageData", "PretrainData", "SFTData", "PreferenceData", "PromptData", "KTOData", "StreamingPretrainData"]
