"""Feed-forward variants against hand computations from their own weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmtrain.model.config import GLU_FFNS
from llmtrain.model.ffn import FFNS, GLU, MLP, build_ffn

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu}


@pytest.mark.parametrize("name", sorted(FFNS))
@pytest.mark.parametrize("bias", [False, True])
def test_ffn_matches_hand_computation(tiny, name: str, bias: bool) -> None:
    torch.manual_seed(0)
    ffn = build_ffn(tiny(ffn=name, bias=bias))
    assert isinstance(ffn, GLU if name in GLU_FFNS else MLP)
    for p in ffn.parameters():
        torch.nn.init.normal_(p)
    assert all((linear.bias is not None) == bias for linear in ffn.modules() if isinstance(linear, torch.nn.Linear))
    x = torch.randn(2, 5, 32)

    def linear(layer: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
        return h @ layer.weight.T + (layer.bias if bias else 0)

    act = ACTS[name]
    if name in GLU_FFNS:
        hidden = act(linear(ffn.gate_proj, x)) * linear(ffn.up_proj, x)
    else:
        hidden = act(linear(ffn.up_proj, x))
    torch.testing.assert_close(ffn(x), linear(ffn.down_proj, hidden))
