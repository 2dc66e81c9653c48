"""Norm layers against their textbook formulas; dtype kept."""

from __future__ import annotations

import pytest
import torch

from llmtrain.model.norms import LayerNorm, RMSNorm, build_norm


def test_rmsnorm_matches_formula() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    norm.weight.data.normal_()
    x = torch.randn(2, 3, 16) * 5
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("bias", [False, True])
def test_layernorm_matches_torch(bias: bool) -> None:
    torch.manual_seed(0)
    norm = LayerNorm(16, eps=1e-5, bias=bias)
    reference = torch.nn.LayerNorm(16, eps=1e-5, bias=bias)
    norm.weight.data.normal_()
    reference.weight.data.copy_(norm.weight)
    if bias:
        norm.bias.data.normal_()
        reference.bias.data.copy_(norm.bias)
    x = torch.randn(2, 3, 16) * 5 + 3
    torch.testing.assert_close(norm(x), reference(x))
    assert (norm.bias is not None) == bias


@pytest.mark.parametrize("cls", [RMSNorm, LayerNorm])
def test_norms_keep_the_input_dtype(cls) -> None:
    norm = cls(16).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16


def test_build_norm_from_config(tiny) -> None:
    assert isinstance(build_norm(tiny(norm="rmsnorm", bias=True), 8), RMSNorm)  # RMSNorm has no bias
    assert build_norm(tiny(norm="layernorm", bias=True), 8).bias is not None
    assert build_norm(tiny(norm="layernorm", bias=False), 8).bias is None
    assert build_norm(tiny(norm_eps=1e-3), 8).eps == 1e-3
