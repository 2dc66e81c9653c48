"""The norms the config picks, against their textbook formulas; dtype kept; eps and bias from the config."""

from __future__ import annotations

import pytest
import torch

from llmtrain.model.norms import build_norm


def test_rmsnorm_matches_formula(tiny) -> None:
    torch.manual_seed(0)
    norm = build_norm(tiny(norm="rmsnorm", norm_eps=1e-6), 16)
    norm.weight.data.normal_()
    x = torch.randn(2, 3, 16) * 5
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("bias", [False, True])
def test_layernorm_matches_formula(tiny, bias: bool) -> None:
    torch.manual_seed(0)
    norm = build_norm(tiny(norm="layernorm", bias=bias, norm_eps=1e-5), 16)
    norm.weight.data.normal_()
    x = torch.randn(2, 3, 16) * 5 + 3
    expected = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = expected * norm.weight + (norm.bias if bias else 0)
    torch.testing.assert_close(norm(x), expected)
    assert (norm.bias is not None) == bias


@pytest.mark.parametrize("name", ["rmsnorm", "layernorm"])
def test_norms_keep_the_input_dtype(tiny, name: str) -> None:
    norm = build_norm(tiny(norm=name), 16)  # fp32 weights, bf16 input: as under DeepSpeed bf16's fp32 buffers
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16
    assert norm.to(torch.bfloat16)(x).dtype == torch.bfloat16


def test_build_norm_from_config(tiny) -> None:
    assert isinstance(build_norm(tiny(norm="rmsnorm", bias=True), 8), torch.nn.RMSNorm)  # RMSNorm has no bias
    assert build_norm(tiny(norm="layernorm", bias=True), 8).bias is not None
    assert build_norm(tiny(norm="layernorm", bias=False), 8).bias is None
    assert build_norm(tiny(norm_eps=1e-3), 8).eps == 1e-3
