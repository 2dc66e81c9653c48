"""Attention: backends agree, soft-cap bounds, attention_logits against a hand computation."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from llmtrain.model import Decoder, ModelConfig
from llmtrain.model.attention import ATTENTION_BACKENDS, Attention, resolve_backend
from llmtrain.model.position import PositionContext, build_position


def make_attention(config: ModelConfig, std: float = 0.3, seed: int = 0) -> Attention:
    """Weights large enough that the logits are O(1) and a wrong mask or bias shows in the output."""
    torch.manual_seed(seed)
    attn = Attention(config)
    for name, p in attn.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=std)
    return attn


def context(config: ModelConfig, backend: str, B: int, T: int, document_ids: Optional[torch.Tensor] = None,
            position_ids: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> PositionContext:
    """What Decoder.trunk builds once per forward, for a chosen backend."""
    positions = torch.arange(T)[None] if position_ids is None else position_ids
    ctx = build_position(config).to(dtype).context(positions, document_ids)
    ctx.kernel = ATTENTION_BACKENDS[backend](ctx, config, B, dtype)
    return ctx


CASES = {  # name -> (config overrides, with packed documents)
    "causal": (dict(position="none"), False),
    "rope-gqa-qknorm": (dict(n_kv_head=2, qk_norm=True), False),
    "alibi": (dict(position="alibi"), False),
    "documents": (dict(), True),
    "alibi-documents": (dict(position="alibi", n_kv_head=1), True),
    "alibi-6-heads": (dict(position="alibi", n_head=6, head_dim=8, bias=True), True),
}
SOFTCAP_CASES = {
    "softcap": (dict(attn_logit_softcap=1.0), False),
    "softcap-alibi-documents": (dict(attn_logit_softcap=1.0, position="alibi"), True),
}


def outputs(tiny, overrides: dict, with_docs: bool, packed, backends: list[str]) -> dict[str, torch.Tensor]:
    config = tiny(**overrides)
    attn = make_attention(config)
    x = torch.randn(2, 16, config.d_model)
    docs, pos = packed if with_docs else (None, None)
    with torch.no_grad():  # flex has no CPU backward
        return {b: attn(x, context(config, b, 2, 16, docs, pos)) for b in backends}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sdpa_matches_eager(tiny, packed, case: str) -> None:
    out = outputs(tiny, *CASES[case], packed, ["sdpa", "eager"])
    torch.testing.assert_close(out["sdpa"], out["eager"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES) + sorted(SOFTCAP_CASES))
def test_flex_matches_eager(tiny, packed, eager_flex, case: str) -> None:
    """BlockMask and score_mod checked through flex_attention's unfused CPU reference (see the eager_flex fixture)."""
    out = outputs(tiny, *{**CASES, **SOFTCAP_CASES}[case], packed, ["flex", "eager"])
    torch.testing.assert_close(out["flex"], out["eager"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_flex_matches_eager_on_cpu(tiny, packed) -> None:
    """The real compiled flex kernel (inductor's CPU template, ~20 s to compile; forward only on CPU)."""
    out = outputs(tiny, *SOFTCAP_CASES["softcap-alibi-documents"], packed, ["flex", "eager"])
    torch.testing.assert_close(out["flex"], out["eager"], atol=1e-5, rtol=1e-5)


def test_auto_backend_resolution(tiny) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend(tiny(), cpu) == resolve_backend(tiny(), cuda) == "sdpa"
    assert resolve_backend(tiny(attn_logit_softcap=30.0), cpu) == "eager"
    assert resolve_backend(tiny(attn_logit_softcap=30.0), cuda) == "flex"
    assert resolve_backend(tiny(attention_backend="eager"), cuda) == "eager"


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_softcap_bounds_attention_logits(tiny, packed, position: str) -> None:
    cap = 2.0
    capped, uncapped = tiny(attn_logit_softcap=cap, position=position), tiny(position=position)
    x = torch.randn(2, 16, 32)
    logits = make_attention(capped, std=1.0).attention_logits(x, context(capped, "eager", 2, 16))
    raw = make_attention(uncapped, std=1.0).attention_logits(x, context(uncapped, "eager", 2, 16))
    finite = torch.isfinite(logits)
    assert raw[torch.isfinite(raw)].abs().max() > 5 * cap  # the cap has something to do
    if position == "rope":
        assert logits[finite].abs().max() <= cap
    else:  # ALiBi's distance penalty is added after the cap: only the content part is bounded
        bias = context(capped, "eager", 2, 16).kernel.bias
        assert (logits - bias)[finite].abs().max() <= cap


# ------------------------------------------------------------------------ attention_logits by hand


def rotate_by_hand(vec: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """RoPE of one (hd,) vector as a complex rotation of the pairs (v_i, v_{i+hd/2})."""
    hd = vec.shape[0]
    angles = position * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    z = torch.complex(vec[: hd // 2].double(), vec[hd // 2:].double()) * torch.exp(1j * angles)
    return torch.cat((z.real, z.imag)).float()


def rms(v: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return v / torch.sqrt(v.pow(2).mean() + eps) * weight


HAND_CASES = {
    "rope-qknorm-gqa-bias": dict(n_kv_head=2, qk_norm=True, bias=True),
    "alibi-documents-gqa": dict(position="alibi", n_kv_head=2),
}


@pytest.mark.parametrize("case", sorted(HAND_CASES))
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_attention_logits_by_hand(tiny, packed, case: str, backend: str) -> None:
    config = tiny(**HAND_CASES[case])
    attn = make_attention(config)
    B, T, H, KV, hd = 2, 16, config.n_head, config.n_kv_head, config.head_dim
    x = torch.randn(B, T, config.d_model)
    docs, pos = packed
    ctx = context(config, backend, B, T, docs, pos)
    logits = attn.attention_logits(x, ctx)  # what the module says
    assert logits.shape == (B, H, T, T) and logits.dtype == torch.float32

    def project(layer: torch.nn.Linear, heads: int) -> torch.Tensor:  # (B, T, heads, hd)
        out = x @ layer.weight.T + (layer.bias if layer.bias is not None else 0)
        return out.view(B, T, heads, hd)

    q, k, v = project(attn.q_proj, H), project(attn.k_proj, KV), project(attn.v_proj, KV)
    slopes = [2.0 ** (-8 * (h + 1) / H) for h in range(H)]  # H = 4: a power of 2
    expected = torch.full((B, H, T, T), -math.inf)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                for j in range(i + 1):
                    if docs[b, i] != docs[b, j]:
                        continue
                    qi, kj = q[b, i, h], k[b, j, h // (H // KV)]  # GQA: query head h reads kv head h // (H/KV)
                    if config.qk_norm:
                        qi = rms(qi, attn.q_norm.weight, config.norm_eps)
                        kj = rms(kj, attn.k_norm.weight, config.norm_eps)
                    if config.position == "rope":
                        qi = rotate_by_hand(qi, int(pos[b, i]), config.rope_theta)
                        kj = rotate_by_hand(kj, int(pos[b, j]), config.rope_theta)
                    expected[b, h, i, j] = qi @ kj / math.sqrt(hd)
                    if config.position == "alibi":
                        expected[b, h, i, j] -= slopes[h] * float(pos[b, i] - pos[b, j])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    # softmax(attention_logits) @ v, then the output projection, is the forward output (on every backend).
    heads = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), v.repeat_interleave(H // KV, dim=2))
    out = heads.reshape(B, T, H * hd) @ attn.out_proj.weight.T + (attn.out_proj.bias if config.bias else 0)
    torch.testing.assert_close(attn(x, ctx), out, atol=1e-5, rtol=1e-5)


def test_attention_logits_through_a_forward_pre_hook(tiny, packed) -> None:
    """How the stability callback probes: capture Attention.forward's args, then call attention_logits(*args)."""
    torch.manual_seed(0)
    model = Decoder(tiny(position="alibi"))
    captured = {}
    handle = model.blocks[1].attn.register_forward_pre_hook(lambda module, args: captured.setdefault("args", args))
    docs, pos = packed
    model(torch.randint(0, 64, (2, 16)), docs, pos)
    handle.remove()
    logits = model.blocks[1].attn.attention_logits(*captured["args"])
    assert logits.shape == (2, 4, 16, 16)
    assert torch.isfinite(logits.diagonal(dim1=-2, dim2=-1)).all()
    assert torch.isinf(logits[:, :, 0, 1]).all()  # the future
    assert torch.isinf(logits[0, :, 5, 4]).all()  # token 5 starts document 1: token 4 is in document 0
