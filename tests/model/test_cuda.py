"""GPU-only checks (skipped without CUDA): the compiled flex kernel and SDPA's GPU kernels against the eager
backend (fp32 attention) in a pure-bf16 module, gradients included; compiled blocks as LanguageModel compiles them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmtrain.model import Decoder
from llmtrain.model.attention import ATTENTION_BACKENDS, Attention
from llmtrain.model.position import build_position

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CASES = {
    "causal": dict(),
    "alibi-documents": dict(position="alibi"),
    "softcap-documents-gqa": dict(attn_logit_softcap=5.0, n_kv_head=2),
    "softcap-alibi": dict(attn_logit_softcap=5.0, position="alibi"),
}
B, T = 2, 256  # two BlockMask blocks per side


def documents() -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [100, 60, 96]
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).repeat(B, 1)
    pos = torch.cat([torch.arange(n) for n in lengths]).repeat(B, 1)
    return docs.cuda(), pos.cuda()


def attend(attn: Attention, config, backend: str, x: torch.Tensor, with_docs: bool):
    docs, pos = documents() if with_docs else (None, None)
    positions = torch.arange(T, device="cuda")[None] if pos is None else pos
    ctx = build_position(config).cuda().context(positions, docs)
    ctx.kernel = ATTENTION_BACKENDS[backend](ctx, config, B, x.dtype)
    x = x.detach().requires_grad_(True)
    y = attn(x, ctx)
    y.float().square().sum().backward()
    return y.float(), x.grad.float()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_gpu_backends_match_eager(tiny, case: str, backend: str) -> None:
    config = tiny(max_seq_len=T, d_model=128, n_head=4, **CASES[case])
    if backend == "sdpa" and config.attn_logit_softcap is not None:
        pytest.skip("SDPA cannot soft-cap")
    torch.manual_seed(0)
    attn = Attention(config).cuda()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(B, T, config.d_model, device="cuda")
    with_docs = "documents" in case
    attn, x = attn.to(torch.bfloat16), x.bfloat16()
    y_ref, g_ref = attend(attn, config, "eager", x, with_docs)  # same bf16 projections, fp32 attention
    y, g = attend(attn, config, backend, x, with_docs)
    # bf16 kernels round every element (2^-8 relative): compare norms of the error, not elements.
    assert (y - y_ref).norm() / y_ref.norm() < 1e-2
    assert (g - g_ref).norm() / g_ref.norm() < 1e-2


@pytest.mark.parametrize("overrides", [dict(), dict(attn_logit_softcap=30.0, position="alibi")])
def test_compiled_blocks_train_in_bf16(tiny, overrides: dict) -> None:
    """block.compile() as LanguageModel(compile="blocks") does, pure bf16, packed documents; auto backend."""
    torch.manual_seed(0)
    model = Decoder(tiny(max_seq_len=T, d_model=128, vocab_size=256, **overrides)).cuda().to(torch.bfloat16)
    for block in model.blocks:
        block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (B, T), device="cuda")
    docs, pos = documents()
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(x, docs, pos).float().flatten(0, 1)[:-1], x.flatten()[1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
