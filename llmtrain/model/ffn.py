"""Feed-forward sublayers, picked by `ModelConfig.ffn` through the FFNS table.

MLP: down(act(up(x))), d_ff = 4·d by default (Vaswani et al. 2017, GPT-2).
GLU: down(act(gate(x)) * up(x)), d_ff = 8/3·d by default so the three matrices hold as many parameters as
the MLP's two (Shazeer 2020, "GLU Variants Improve Transformer"; SwiGLU is the Llama choice).
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from llmtrain.model.config import ModelConfig

Activation = Callable[[Tensor], Tensor]


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: Activation, bias: bool) -> None:
        super().__init__()
        self.activation = activation
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)  # output projection: scaled init (Decoder)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d_model) -> (B, T, d_model)
        return self.down_proj(self.activation(self.up_proj(x)))  # hidden (B, T, d_ff)


class GLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: Activation, bias: bool) -> None:
        super().__init__()
        self.activation = activation
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)  # output projection: scaled init (Decoder)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d_model) -> (B, T, d_model)
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))  # hidden (B, T, d_ff)


# name -> (class, activation). gelu is the exact erf form, as in the GEGLU paper.
FFNS: dict[str, tuple[type[MLP] | type[GLU], Activation]] = {
    "relu": (MLP, F.relu),
    "gelu": (MLP, F.gelu),
    "silu": (MLP, F.silu),
    "swiglu": (GLU, F.silu),
    "geglu": (GLU, F.gelu),
    "reglu": (GLU, F.relu),
}


def build_ffn(config: ModelConfig) -> MLP | GLU:
    """The feed-forward sublayer named by `config.ffn`, d_model -> d_ff -> d_model, biases iff config.bias."""
    cls, activation = FFNS[config.ffn]
    return cls(config.d_model, config.d_ff, activation, bias=config.bias)
