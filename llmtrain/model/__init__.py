"""The decoder model: plain torch.nn, configured by ModelConfig."""

from llmtrain.model.config import ConfigError, ModelConfig
from llmtrain.model.transformer import Decoder

__all__ = ["ConfigError", "Decoder", "ModelConfig"]
