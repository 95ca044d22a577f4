"""The shared backbone: configuration, Transformer, Hugging Face interop."""

from llmstages.model.config import PRESETS, ModelConfig
from llmstages.model.transformer import Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer"]
