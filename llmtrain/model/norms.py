"""Normalization layers, picked by `ModelConfig.norm` through the NORMS table: torch's own `nn.RMSNorm` and
`nn.LayerNorm` (fused kernels; both return the input dtype, which matters under DeepSpeed bf16, where the model runs
in pure bf16 without autocast and a norm that returned fp32 would promote everything after it)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from llmtrain.model.config import ModelConfig

Norm = nn.RMSNorm | nn.LayerNorm

# RMSNorm (Zhang & Sennrich 2019): x / rms(x) * weight, no mean subtraction and, by definition, no bias.
# LayerNorm (Ba et al. 2016): (x - mean) / std * weight + bias, the bias there iff config.bias.
NORMS: dict[str, Callable[[ModelConfig, int], Norm]] = {
    "rmsnorm": lambda config, dim: nn.RMSNorm(dim, eps=config.norm_eps),
    "layernorm": lambda config, dim: nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias),
}
NORM_TYPES = (nn.RMSNorm, nn.LayerNorm)


def build_norm(config: ModelConfig, dim: int) -> Norm:
    """The norm named by `config.norm` over the last `dim` features (eps and bias from the config)."""
    return NORMS[config.norm](config, dim)
