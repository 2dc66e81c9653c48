"""Named model shapes (litgpt's Config.from_name): ModelConfig.from_name("llama-124m", vocab_size=8192).
configs/llama-<name>.yaml use the same shapes (tests/test_config_files.py keeps them equal)."""

from __future__ import annotations

from typing import Any

# Llama recipe at GPT-3's sizes (Brown et al. 2020, Table 2.1): every other field keeps ModelConfig's default
# (pre-norm RMSNorm, SwiGLU with d_ff = 8/3·d rounded to 256, RoPE, no biases, vocab 32000, sequence 2048).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-124m": {"d_model": 768, "n_layer": 12, "n_head": 12},
    "llama-350m": {"d_model": 1024, "n_layer": 24, "n_head": 16},
    "llama-1b": {"d_model": 2048, "n_layer": 16, "n_head": 16},
}
