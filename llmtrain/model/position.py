"""Position information, picked by `ModelConfig.position` through the POSITIONS table.

Each encoding does up to two things, once per Decoder forward:
  - `embed(h, positions)`: add an absolute position vector to the token embeddings (learned, sinusoidal);
  - `context(positions, document_ids)`: build the PositionContext that every attention layer reads
    (RoPE cos/sin rows, ALiBi slopes), so no layer recomputes them.
`positions` is (B, T) when the caller gives position_ids (they restart at 0 for each packed document) and
(1, T) = 0..T-1 otherwise, which broadcasts over the batch and keeps bias tensors batch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from llmtrain.model.config import ModelConfig

# q, k, v (B, n_head, T, head_dim) -> y (B, n_head, T, head_dim); built by attention.build_attention_kernel.
AttentionKernel = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class PositionContext:
    """What every attention layer needs about positions and masking, computed once per Decoder forward."""

    positions: Tensor                       # (B|1, T) int
    document_ids: Optional[Tensor] = None   # (B, T); None = one causal sequence per row
    rope_cos: Optional[Tensor] = None       # (B|1, T, head_dim/2), table dtype (cast to q's dtype at use)
    rope_sin: Optional[Tensor] = None       # (B|1, T, head_dim/2)
    alibi_slopes: Optional[Tensor] = None   # (n_head,)
    kernel: Optional[AttentionKernel] = None  # the attention backend with its masks, set by the Decoder

    def rotate(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """RoPE on q (B, T, H, hd) and k (B, T, KV, hd); identity for the other encodings."""
        if self.rope_cos is None:
            return q, k
        return apply_rope(q, self.rope_cos, self.rope_sin), apply_rope(k, self.rope_cos, self.rope_sin)


class PositionEncoding(nn.Module):
    """Base: adds nothing and puts nothing in the context. Subclasses override what they use."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()

    def reset_parameters(self) -> None:
        """(Re)build fixed tables and init learned ones; called by Decoder.reset_parameters (also after meta init)."""

    def embed(self, h: Tensor, positions: Tensor) -> Tensor:  # (B, T, d_model) -> (B, T, d_model)
        return h

    def context(self, positions: Tensor, document_ids: Optional[Tensor]) -> PositionContext:
        return PositionContext(positions, document_ids)


class NoPE(PositionEncoding):
    """No position signal at all: the causal mask alone lets a decoder infer order (Kazemnejad et al. 2023)."""


# ---------------------------------------------------------------------------------------------------- RoPE


def float64_range(end: int, step: int = 1, device: Optional[torch.device] = None) -> Tensor:
    """0, step, ... < end in float64, made from integers. DeepSpeed's zero.Init (ZeRO-3 builds the model under
    it) casts every floating tensor that torch.arange/empty/zeros/... create to the run's dtype: a float64 arange
    came out bf16, which is not exact past 256 (2047 -> 2048), and the RoPE tables built on it gave most positions
    of a 2048-token sequence wrong angles (0.1 nats higher loss at step 200, docs/benchmarks.md)."""
    return torch.arange(0, end, step, device=device).to(torch.float64)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: Optional[torch.device] = None
                ) -> tuple[Tensor, Tensor]:
    """cos, sin (max_seq_len, head_dim/2) of angle pos · theta^(-2i/head_dim), computed in float64."""
    inv_freq = theta ** (-float64_range(head_dim, 2, device) / head_dim)
    angles = torch.outer(float64_range(max_seq_len, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) of x (B, T, H, hd) by the angles in cos/sin (B|1, T, hd/2).

    Half-split pairing ("rotate_half"), as in Hugging Face's Llama, so exported q/k weights need no permutation.
    The tables are cast to x's dtype: under pure bf16 fp32 tables would promote q/k to fp32 and break SDPA.
    """
    cos = cos.to(x.dtype).unsqueeze(2)  # (B|1, T, 1, hd/2): same angle for every head
    sin = sin.to(x.dtype).unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, H, hd/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RoPE(PositionEncoding):
    """Rotary position embedding (Su et al. 2021): q·k depends on positions only through their difference."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.head_dim, self.max_seq_len, self.theta = config.head_dim, config.max_seq_len, config.rope_theta
        # Non-persistent: derived from the config, so not in checkpoints; rebuilt by reset_parameters.
        self.register_buffer("cos", torch.empty(self.max_seq_len, self.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(self.max_seq_len, self.head_dim // 2), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cos, sin = rope_tables(self.head_dim, self.max_seq_len, self.theta, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def context(self, positions: Tensor, document_ids: Optional[Tensor]) -> PositionContext:
        return PositionContext(positions, document_ids, rope_cos=self.cos[positions], rope_sin=self.sin[positions])


# ---------------------------------------------------------------------------------- absolute embeddings


class LearnedPosition(PositionEncoding):
    """A learned vector per position added to the token embedding (GPT-2)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.max_seq_len, config.d_model)  # normal(0, init_std) by the Decoder

    def embed(self, h: Tensor, positions: Tensor) -> Tensor:
        return h + self.embedding(positions)  # (B, T, d) + (B|1, T, d)


def sinusoidal_table(max_seq_len: int, d_model: int, device: Optional[torch.device] = None) -> Tensor:
    """(max_seq_len, d_model): PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same) (Vaswani et al. 2017)."""
    inv_freq = 10000.0 ** (-float64_range(d_model, 2, device) / d_model)
    angles = torch.outer(float64_range(max_seq_len, device=device), inv_freq)
    # Interleaved sin, cos, sin, ...; odd d_model: one sine column more than cosines
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)[:, :d_model]


class SinusoidalPosition(PositionEncoding):
    """Fixed sinusoids added to the token embedding (original Transformer); no parameters.

    The table is scaled to `sinusoid_rms`, by default the token embeddings' RMS at init. Unscaled (RMS 1/sqrt(2))
    it was 35x the embedding at init_std 0.02 and drowned the token signal early in training (+1.8 nats against
    RoPE after 6.5M tokens). Scaled, it fades as the embeddings grow: over 49M tokens it ends no better than no
    positions (docs/ablations.md, position encodings). Vaswani et al. balance the two the other way: the table at
    RMS 1/sqrt(2) and the embeddings multiplied by sqrt(d_model) (`sinusoid_rms`, `scale_embeddings`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.max_seq_len, self.d_model = config.max_seq_len, config.d_model
        rms = config.sinusoid_rms
        if rms is None:  # the token embeddings' RMS at init
            rms = config.init_std * (math.sqrt(config.d_model) if config.scale_embeddings else 1.0)
        self.scale = rms * math.sqrt(2.0)  # a sin/cos table has RMS 1/sqrt(2)
        self.register_buffer("table", torch.empty(self.max_seq_len, self.d_model), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.table.copy_(sinusoidal_table(self.max_seq_len, self.d_model, device=self.table.device))

    def embed(self, h: Tensor, positions: Tensor) -> Tensor:
        return h + (self.scale * self.table[positions]).to(h.dtype)  # (B, T, d) + (B|1, T, d)


# ---------------------------------------------------------------------------------------------------- ALiBi


def alibi_slopes(n_head: int) -> list[float]:
    """Per-head slopes of ALiBi (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n), ... for n a
    power of 2; otherwise the slopes of the closest smaller power of 2, then every other slope of twice that."""
    if math.log2(n_head).is_integer():
        start = 2.0 ** (-8.0 / n_head)
        return [start ** (i + 1) for i in range(n_head)]
    closest = 2 ** math.floor(math.log2(n_head))
    return alibi_slopes(closest) + alibi_slopes(2 * closest)[0::2][: n_head - closest]


def alibi_bias(slopes: Tensor, positions: Tensor) -> Tensor:
    """-slope_h · (pos_i - pos_j): fp32 (B|1, H, T, T) added to the attention logits of query i, key j."""
    distance = positions[:, None, :, None] - positions[:, None, None, :]  # (B|1, 1, T, T)
    return -slopes.float()[None, :, None, None] * distance


class ALiBi(PositionEncoding):
    """Attention with linear biases: no embedding, a per-head penalty linear in the distance to the key."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.n_head = config.n_head
        self.register_buffer("slopes", torch.empty(self.n_head), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.slopes.copy_(torch.tensor(alibi_slopes(self.n_head), device=self.slopes.device))

    def context(self, positions: Tensor, document_ids: Optional[Tensor]) -> PositionContext:
        return PositionContext(positions, document_ids, alibi_slopes=self.slopes)


POSITIONS: dict[str, type[PositionEncoding]] = {
    "rope": RoPE,
    "learned": LearnedPosition,
    "sinusoidal": SinusoidalPosition,
    "alibi": ALiBi,
    "none": NoPE,
}


def build_position(config: ModelConfig) -> PositionEncoding:
    return POSITIONS[config.position](config)
