"""Normalization layers, picked by `ModelConfig.norm` through the NORMS table.

Both keep the dtype of their input: under DeepSpeed bf16 the model runs in pure bf16 without autocast, and a
norm that returned fp32 would promote everything after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmtrain.model.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): no mean subtraction and, by definition, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    @classmethod
    def from_config(cls, config: ModelConfig, dim: int) -> RMSNorm:
        return cls(dim, config.norm_eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:  # (..., dim) -> (..., dim), same dtype
        # The fused op accumulates in fp32 internally and returns the input dtype.
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class LayerNorm(nn.Module):
    """(x - mean) / std * weight + bias (Ba et al. 2016); the bias is there iff `bias` (config.bias)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    @classmethod
    def from_config(cls, config: ModelConfig, dim: int) -> LayerNorm:
        return cls(dim, config.norm_eps, bias=config.bias)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:  # (..., dim) -> (..., dim), same dtype
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, bias={self.bias is not None}"


NORMS: dict[str, type[RMSNorm] | type[LayerNorm]] = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}


def build_norm(config: ModelConfig, dim: int) -> RMSNorm | LayerNorm:
    """The norm named by `config.norm` over the last `dim` features (eps and bias from the config)."""
    return NORMS[config.norm].from_config(config, dim)
