"""Causal self-attention with GQA, qk-norm, logit soft-capping, and three interchangeable backends.

All backends compute the same function (tests hold sdpa and flex to eager); they differ in cost
(B batch, H heads, T sequence length):

  sdpa   `F.scaled_dot_product_attention`.
         - causal only: `is_causal=True`, no mask tensor; on GPU FlashAttention-2 (or cuDNN): O(T) memory, the
           masked half of the T×T work skipped. The fast path; the Llama default takes it.
         - document masking: a boolean block-causal mask (B, 1, T, T), built once per forward (B·T² bytes).
           Flash takes no mask, so PyTorch runs the memory-efficient kernel, which reads the mask in every layer
           and does not skip masked blocks.
         - ALiBi: an additive float mask (B|1, H, T, T) in the activation dtype, built once per forward and
           shared by the layers: H·T²·2 bytes in bf16 (12·2048²·2 = 100 MB), ×B when position_ids are given.
         - cannot soft-cap attention logits (ModelConfig refuses backend "sdpa" with attn_logit_softcap).
  flex   `flex_attention` under torch.compile (compiled once per process, lazily; the first call of each shape
         compiles for seconds to tens of seconds). Causal and document masks go in a BlockMask, a
         (B|1, 1, T/128, T/128) block table whose empty blocks are skipped; soft-cap and ALiBi go in a score_mod
         applied inside the kernel. No T×T tensor in the layers, though building the BlockMask materializes a
         (B|1, 1, T, T) boolean once per forward. Meant for CUDA (on CPU it runs forward only, no backward).
  eager  explicit q·kᵀ, softmax and ·v in fp32: fp32 scores and probabilities (B, H, T, T) per layer,
         4·B·H·T² bytes each, kept for backward. Runs anywhere; the CPU path for soft-cap, and the reference.
  auto   sdpa unless attn_logit_softcap is set (SDPA cannot soft-cap); then flex on CUDA, eager elsewhere.

Measured (H100, torch 2.11, bf16, one Attention layer forward+backward with its projections, B=8 T=2048 H=12
head_dim=64, mean of 50 calls; peak memory includes inputs, weights and masks; single runs, ±20% noise):
                 causal          +ALiBi          documents       documents+ALiBi  soft-cap
  sdpa           1.9 ms  364 MiB 2.1 ms  460 MiB 2.8 ms  468 MiB 2.1 ms 1132 MiB  -
  flex           2.8 ms  317 MiB 2.1 ms  316 MiB 3-4 ms  324 MiB 1.8 ms  316 MiB  3.3 ms  317 MiB
  eager         17.7 ms 6404 MiB 17.0 ms 6579 MiB 17.7 ms 6523 MiB 16.9 ms 7923 MiB 24.6 ms 7940 MiB
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from llmtrain.model.config import ModelConfig
from llmtrain.model.position import AttentionKernel, PositionContext, alibi_bias


def soft_cap(x: Tensor, cap: Optional[float]) -> Tensor:
    """cap · tanh(x / cap): smooth bound |x| < cap (Gemma 2); identity when cap is None."""
    return x if cap is None else cap * torch.tanh(x / cap)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, KV, T, hd) -> (B, KV·n_rep, T, hd): query head i reads k/v head i // n_rep (as in HF Llama)."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


# ------------------------------------------------------------------------------------- masks and biases


def allowed_mask(ctx: PositionContext) -> Tensor:
    """bool (B|1, 1, T, T): True where query i may attend key j (j <= i, and same document when given)."""
    T = ctx.positions.shape[-1]
    allowed = torch.ones(T, T, dtype=torch.bool, device=ctx.positions.device).tril()[None]  # (1, T, T)
    if ctx.document_ids is not None:
        docs = ctx.document_ids
        allowed = allowed & (docs[:, :, None] == docs[:, None, :])  # (B, T, T): block-diagonal causal
    return allowed[:, None]


def additive_bias(ctx: PositionContext) -> Tensor:
    """fp32 (B|1, H|1, T, T) added to the logits: ALiBi where allowed, -inf where masked."""
    allowed = allowed_mask(ctx)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, -math.inf)
    if ctx.alibi_slopes is not None:
        bias = bias + alibi_bias(ctx.alibi_slopes, ctx.positions)
    return bias


def attention_scores(q: Tensor, k: Tensor, bias: Tensor, scale: float, softcap: Optional[float]) -> Tensor:
    """fp32 pre-softmax logits (B, H, T, T) = softcap(q·kᵀ · scale) + bias. Soft-cap before the bias, as the
    flex score_mod does: ALiBi's distance penalty is not squashed."""
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, T, T)
    return soft_cap(scores, softcap) + bias


# ------------------------------------------------------------------------------------------------ backends


class SDPAKernel:
    """F.scaled_dot_product_attention; the mask (if any) is built once per Decoder forward."""

    def __init__(self, ctx: PositionContext, config: ModelConfig, batch_size: int, dtype: torch.dtype) -> None:
        self.scale = config.head_dim ** -0.5
        self.mask: Optional[Tensor] = None  # None -> is_causal=True (flash)
        if ctx.alibi_slopes is not None:
            self.mask = additive_bias(ctx).to(dtype)  # (B|1, H, T, T), -inf where masked
        elif ctx.document_ids is not None:
            self.mask = allowed_mask(ctx)  # bool (B, 1, T, T)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # (B, H, T, hd) each -> (B, H, T, hd)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.mask is None,
                                              scale=self.scale)


class EagerKernel:
    """Explicit fp32 matmul + softmax: the reference, and the CPU path for soft-capping."""

    def __init__(self, ctx: PositionContext, config: ModelConfig, batch_size: int, dtype: torch.dtype) -> None:
        self.scale, self.softcap = config.head_dim ** -0.5, config.attn_logit_softcap
        self.bias = additive_bias(ctx)  # fp32 (B|1, H|1, T, T)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        probs = attention_scores(q, k, self.bias, self.scale, self.softcap).softmax(dim=-1)  # (B, H, T, T) fp32
        return torch.matmul(probs, v.float()).to(v.dtype)  # (B, H, T, hd)


_compiled_flex_attention: Optional[Callable[..., Tensor]] = None


def compiled_flex_attention() -> Callable[..., Tensor]:
    """flex_attention is only fused (and only memory-light) under torch.compile: compile it once, on first use.
    Inside a region that is already being compiled (e.g. block.compile()), dynamo lowers flex_attention itself."""
    global _compiled_flex_attention
    if torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


class FlexKernel:
    """flex_attention: masks as a BlockMask (empty blocks skipped), soft-cap and ALiBi as a score_mod."""

    def __init__(self, ctx: PositionContext, config: ModelConfig, batch_size: int, dtype: torch.dtype) -> None:
        self.scale = config.head_dim ** -0.5
        T = ctx.positions.shape[-1]
        docs = ctx.document_ids

        def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return q_idx >= kv_idx

        def causal_documents(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])

        mask_mod, mask_batch = (causal, None) if docs is None else (causal_documents, batch_size)
        self.block_mask: BlockMask = create_block_mask(mask_mod, mask_batch, None, T, T, device=ctx.positions.device)

        cap = config.attn_logit_softcap
        slopes = None if ctx.alibi_slopes is None else ctx.alibi_slopes.float()
        pos = ctx.positions.expand(batch_size, T)  # (B, T) view: the kernel indexes it by batch

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            # score is already q·k·scale; same order as attention_scores: soft-cap, then ALiBi.
            if cap is not None:
                score = cap * torch.tanh(score / cap)
            if slopes is not None:
                score = score - slopes[h] * (pos[b, q_idx] - pos[b, kv_idx])
            return score

        self.score_mod = None if cap is None and slopes is None else score_mod

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return compiled_flex_attention()(q, k, v, score_mod=self.score_mod, block_mask=self.block_mask,
                                         scale=self.scale)


ATTENTION_BACKENDS: dict[str, type[SDPAKernel] | type[EagerKernel] | type[FlexKernel]] = {
    "sdpa": SDPAKernel,
    "flex": FlexKernel,
    "eager": EagerKernel,
}


def resolve_backend(config: ModelConfig, device: torch.device) -> str:
    """config.attention_backend, with "auto" made concrete for the device the model runs on."""
    if config.attention_backend != "auto":
        return config.attention_backend
    if config.attn_logit_softcap is None:
        return "sdpa"
    return "flex" if device.type == "cuda" else "eager"


def build_attention_kernel(config: ModelConfig, ctx: PositionContext, batch_size: int,
                           dtype: torch.dtype) -> AttentionKernel:
    """The backend for this forward, with its masks built once for all layers."""
    backend = ATTENTION_BACKENDS[resolve_backend(config, ctx.positions.device)]
    return backend(ctx, config, batch_size, dtype)


# --------------------------------------------------------------------------------------------- the module


class Attention(nn.Module):
    """Multi-head causal self-attention; n_kv_head < n_head gives grouped-query attention (Ainslie et al. 2023)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, self.n_head, self.n_kv_head, self.head_dim = config.d_model, config.n_head, config.n_kv_head, config.head_dim
        self.scale = self.head_dim ** -0.5
        self.softcap = config.attn_logit_softcap
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=config.bias)
        self.out_proj = nn.Linear(self.n_head * self.head_dim, d, bias=config.bias)  # scaled init (Decoder)
        # qk-norm: one RMSNorm over head_dim for q and one for k, shared by the heads, before RoPE; it bounds
        # the logits that otherwise grow until softmax saturates (Dehghani et al. 2023, Wortsman et al. 2023).
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else nn.Identity()

    def project(self, x: Tensor, positions: PositionContext) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, d_model) -> q, k, v (B, n_head, T, head_dim), after qk-norm, RoPE and the GQA repeat.

        qk-norm and RoPE run in the projections' own (B, T, heads, hd) layout and only then is it viewed as
        (B, heads, T, hd): q stays stored token-major, SDPA's output follows q's layout, and so the (B, T, d_model)
        view for out_proj and the q/k gradients on their way back to q_proj/k_proj need no transposing copy (with
        RoPE applied after the transpose, inductor stored q head-major and copied both, twice per layer)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim))  # (B, T, H, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim))  # (B, T, KV, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, KV, hd)
        q, k = positions.rotate(q, k)
        # Repeat k/v to n_head explicitly: SDPA's enable_gqa can route to slower kernels.
        n_rep = self.n_head // self.n_kv_head
        return q.transpose(1, 2), repeat_kv(k.transpose(1, 2), n_rep), repeat_kv(v.transpose(1, 2), n_rep)

    def forward(self, x: Tensor, positions: PositionContext) -> Tensor:  # (B, T, d_model) -> (B, T, d_model)
        B, T, _ = x.shape
        q, k, v = self.project(x, positions)
        y = positions.kernel(q, k, v)  # (B, H, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def attention_logits(self, x: Tensor, positions: PositionContext) -> Tensor:
        """fp32 pre-softmax logits (B, n_head, T, T) of forward(x, positions): after qk-norm, RoPE, scaling,
        soft-cap and ALiBi; -inf where masked (future keys, other documents). Materializes B·H·T² floats."""
        q, k, _ = self.project(x, positions)
        return attention_scores(q, k, additive_bias(positions), self.scale, self.softcap)
