"""ModelConfig validation and the num_params formula, checked against the built module."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmtrain.model import ConfigError, Decoder, ModelConfig
from llmtrain.model.config import FFN_CHOICES, NORM_CHOICES, POSITION_CHOICES
from llmtrain.model.ffn import FFNS
from llmtrain.model.norms import NORMS
from llmtrain.model.position import POSITIONS
from llmtrain.model.transformer import RESIDUALS


def test_tables_cover_the_config_choices() -> None:
    assert set(NORMS) == set(NORM_CHOICES)
    assert set(FFNS) == set(FFN_CHOICES)
    assert set(POSITIONS) == set(POSITION_CHOICES)
    assert set(RESIDUALS) == {"pre", "post", "sandwich"}


@pytest.mark.parametrize("overrides, field, value", [
    (dict(norm="batchnorm"), "norm", "batchnorm"),
    (dict(norm_position="middle"), "norm_position", "middle"),
    (dict(ffn="swish"), "ffn", "swish"),
    (dict(position="xpos"), "position", "xpos"),
    (dict(attention_backend="flash"), "attention_backend", "flash"),
    (dict(d_model=30, n_head=4), "d_model", "30"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head", "3"),
    (dict(d_model=36, n_head=4), "head_dim", "9"),  # head_dim 9 is odd: RoPE rotates pairs
    (dict(head_dim=7), "head_dim", "7"),
    (dict(attention_backend="sdpa", attn_logit_softcap=30.0), "attention_backend", "sdpa"),
    (dict(attn_logit_softcap=-1.0), "attn_logit_softcap", "-1.0"),
])
def test_config_errors_name_field_and_value(tiny, overrides, field, value) -> None:
    with pytest.raises(ConfigError) as err:
        tiny(**overrides)
    assert f"{field}=" in str(err.value) and value in str(err.value)


def test_odd_head_dim_is_fine_without_rope(tiny) -> None:
    assert tiny(d_model=36, n_head=4, position="alibi").head_dim == 9


def test_sequence_longer_than_max_seq_len_names_both(tiny) -> None:
    model = Decoder(tiny(max_seq_len=16))
    with pytest.raises(ValueError, match=r"T=17.*max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_default_d_ff() -> None:
    assert ModelConfig(d_model=768, ffn="swiglu").d_ff == 2048  # 8/3·768 = 2048
    assert ModelConfig(d_model=768, ffn="gelu").d_ff == 3072


GRID = [
    dict(norm=norm, norm_position=where, bias=bias, ffn=ffn, position=position)
    for norm, where, bias, ffn, position in itertools.product(
        NORM_CHOICES, ("pre", "post", "sandwich"), (False, True), ("gelu", "swiglu"), POSITION_CHOICES)
] + [
    dict(qk_norm=True), dict(tie_embeddings=True), dict(tie_embeddings=True, position="learned"),
    dict(n_kv_head=1), dict(n_kv_head=2, bias=True), dict(head_dim=6, n_kv_head=2), dict(head_dim=12, qk_norm=True),
    dict(ffn="reglu", d_ff=40), dict(ffn="relu", d_ff=40, bias=True), dict(ffn="geglu"), dict(ffn="silu"),
    dict(norm_position="sandwich", norm="layernorm", bias=True, qk_norm=True, tie_embeddings=True),
]


@pytest.mark.parametrize("overrides", GRID, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_num_params_matches_module(tiny, overrides) -> None:
    config = tiny(**overrides)
    model = Decoder(config)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    embeddings = model.tok_embeddings.weight.numel() + sum(
        m.weight.numel() for m in model.position.modules() if isinstance(m, torch.nn.Embedding))
    expected = sum(p.numel() for p in model.parameters()) - embeddings
    if config.tie_embeddings:
        expected += model.tok_embeddings.weight.numel()  # the tied matrix still does the head matmul
    assert config.num_params(include_embedding=False) == expected
