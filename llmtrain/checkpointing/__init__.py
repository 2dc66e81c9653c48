"""Checkpoints, one lifecycle: reading every format safely (readers), converting (convert), Hugging Face export
(hf)."""
