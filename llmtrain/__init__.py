"""llmtrain: LLM pretraining on Lightning and DeepSpeed, built to study which Transformer design choices matter."""

__version__ = "0.1.0"
