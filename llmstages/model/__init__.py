"""The shared backbone: configuration, Transformer (with a KV cache), LoRA, Hugging Face interop."""

from llmstages.model.config import PRESETS, ModelConfig
from llmstages.model.lora import LoRAConfig
from llmstages.model.transformer import KVCache, Transformer

__all__ = ["KVCache", "LoRAConfig", "ModelConfig", "PRESETS", "Transformer"]
