"""Checkpoints, one lifecycle: when a fit saves (periodic), how a save is written (save), what a resume starts from
(resume), reading every format safely (readers), converting (convert), Hugging Face export (hf)."""
