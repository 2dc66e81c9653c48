"""ModelConfig: every architecture switch of the decoder, validated when constructed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional, get_args

# Literal types: `llmtrain fit --help` lists the choices; __post_init__ still checks them, for configs built in Python.
Norm = Literal["rmsnorm", "layernorm"]
NormPosition = Literal["pre", "post", "sandwich"]
Ffn = Literal["relu", "gelu", "silu", "swiglu", "geglu", "reglu"]
Position = Literal["rope", "learned", "sinusoidal", "alibi", "none"]
AttentionBackend = Literal["auto", "sdpa", "flex", "eager"]

NORM_CHOICES: tuple[str, ...] = get_args(Norm)
NORM_POSITIONS: tuple[str, ...] = get_args(NormPosition)
FFN_CHOICES: tuple[str, ...] = get_args(Ffn)
GLU_FFNS = ("swiglu", "geglu", "reglu")
POSITION_CHOICES: tuple[str, ...] = get_args(Position)
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)


class ConfigError(ValueError):
    """A config field holds a value that cannot work; the message names field, value and what is valid."""


def _fail(field: str, value: object, valid: str) -> None:
    raise ConfigError(f"model config: {field}={value!r} is invalid: {valid}")


def _choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field, value, f"choose one of {', '.join(choices)}")


def _positive(field: str, value: Optional[float]) -> None:
    if value is not None and not value > 0:
        _fail(field, value, "must be > 0")


@dataclass
class ModelConfig:
    """Decoder-only Transformer. Defaults are the Llama recipe: pre-norm RMSNorm, SwiGLU, RoPE, no biases.

    Args:
        vocab_size: token ids 0..vocab_size-1; must cover the tokenizer's vocabulary.
        max_seq_len: longest sequence the model takes (the data's seq_len must not exceed it).
        d_model: width of the residual stream.
        n_layer: number of Transformer blocks.
        n_head: query heads per attention layer.
        n_kv_head: key/value heads shared by the query heads (grouped-query attention); null = n_head (plain MHA).
        head_dim: width of each head; null = d_model / n_head (otherwise q/k/v project d_model -> n_head * head_dim).
        d_ff: hidden width of the feed-forward layer; null = 4 * d_model for plain MLPs, 8/3 * d_model rounded up
            to ffn_multiple_of for GLUs (equal parameters).
        ffn_multiple_of: the default GLU d_ff is rounded up to a multiple of this.
        norm: rmsnorm (Llama) or layernorm (GPT-2).
        norm_position: pre (norm before each sublayer), post (original Transformer, norm after the residual add),
            sandwich (norm before and after each sublayer).
        norm_eps: epsilon inside every norm.
        bias: biases on every linear layer and on LayerNorm (RMSNorm has none by definition).
        ffn: relu, gelu, silu (plain MLPs) or swiglu, geglu, reglu (gated linear units, Shazeer 2020).
        position: rope (rotary, rope_theta), learned (absolute embeddings), sinusoidal (fixed absolute), alibi
            (linear attention bias), none (causal mask only).
        rope_theta: RoPE base frequency.
        sinusoid_rms: RMS of the fixed sinusoid table (position sinusoidal); null = the token embeddings' RMS at
            init (init_std, times sqrt(d_model) with scale_embeddings). Vaswani et al.'s unscaled table is 1/sqrt(2).
        scale_embeddings: multiply the token embeddings by sqrt(d_model) (Vaswani et al. 2017, Gemma).
        qk_norm: RMSNorm of q and k per head before the dot product (Dehghani et al. 2023, Wortsman et al. 2023).
        attn_logit_softcap: cap * tanh(logit / cap) on attention logits (Gemma 2); null = off.
        final_logit_softcap: the same on the output logits; null = off.
        tie_embeddings: share the input embedding matrix with the LM head.
        init_std: std of the normal init; output projections are scaled by 1/sqrt(2 * n_layer).
        attention_backend: auto (fused SDPA where the variant allows it, otherwise flex_attention on CUDA or eager
            on CPU), sdpa, flex (flex_attention, CUDA), eager (plain matmuls).
    """

    vocab_size: int = 32000
    max_seq_len: int = 2048
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None
    head_dim: Optional[int] = None
    d_ff: Optional[int] = None
    ffn_multiple_of: int = 256
    norm: Norm = "rmsnorm"
    norm_position: NormPosition = "pre"
    norm_eps: float = 1e-5
    bias: bool = False
    ffn: Ffn = "swiglu"
    position: Position = "rope"
    rope_theta: float = 10000.0
    sinusoid_rms: Optional[float] = None
    scale_embeddings: bool = False
    qk_norm: bool = False
    attn_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention_backend: AttentionBackend = "auto"

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named shape (llmtrain.model.presets.PRESETS, e.g. "llama-124m") with `overrides` on top."""
        from llmtrain.model.presets import PRESETS

        if name not in PRESETS:
            raise ConfigError(f"model preset {name!r} is unknown: choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def __post_init__(self) -> None:
        for field in ("vocab_size", "max_seq_len", "d_model", "n_layer", "n_head", "ffn_multiple_of"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                _fail(field, value, "must be a positive integer")
        _choice("norm", self.norm, NORM_CHOICES)
        _choice("norm_position", self.norm_position, NORM_POSITIONS)
        _choice("ffn", self.ffn, FFN_CHOICES)
        _choice("position", self.position, POSITION_CHOICES)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        for field in ("norm_eps", "rope_theta", "init_std", "attn_logit_softcap", "final_logit_softcap",
                      "sinusoid_rms"):
            _positive(field, getattr(self, field))
        if self.sinusoid_rms is not None and self.position != "sinusoidal":
            _fail("sinusoid_rms", self.sinusoid_rms,
                  f"applies to position 'sinusoidal' (position is {self.position!r})")
        if self.attention_backend == "sdpa" and self.attn_logit_softcap is not None:
            # SDPA has no hook for a score modification: the cap would be silently ignored.
            _fail("attention_backend", self.attention_backend,
                  f"'sdpa' cannot soft-cap attention logits (attn_logit_softcap={self.attn_logit_softcap}); "
                  "use 'auto', 'flex' or 'eager'")

        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_kv_head <= 0 or self.n_head % self.n_kv_head != 0:
            _fail("n_kv_head", self.n_kv_head, f"must be a positive divisor of n_head={self.n_head}")
        if self.head_dim is None:
            if self.d_model % self.n_head != 0:
                _fail("d_model", self.d_model,
                      f"must be divisible by n_head={self.n_head} (or set head_dim explicitly)")
            self.head_dim = self.d_model // self.n_head
        if self.head_dim <= 0:
            _fail("head_dim", self.head_dim, "must be a positive integer")
        if self.position == "rope" and self.head_dim % 2 != 0:
            _fail("head_dim", self.head_dim, "must be even with position='rope' (RoPE rotates pairs of dims)")
        if self.d_ff is None:
            self.d_ff = self.default_d_ff(self.d_model, self.ffn, self.ffn_multiple_of)
        if self.d_ff <= 0:
            _fail("d_ff", self.d_ff, "must be a positive integer")

    @staticmethod
    def default_d_ff(d_model: int, ffn: str, multiple_of: int = 256) -> int:
        """4·d for plain MLPs; 8/3·d rounded up to `multiple_of` for GLUs (same parameter count, Shazeer 2020)."""
        if ffn in GLU_FFNS:
            return multiple_of * math.ceil(8 * d_model / 3 / multiple_of)
        return 4 * d_model

    @property
    def is_glu(self) -> bool:
        return self.ffn in GLU_FFNS

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count of `Decoder(self)`, from the formula (tests check it against the module)."""
        d, h, hd, kv, f = self.d_model, self.n_head, self.head_dim, self.n_kv_head, self.d_ff
        b = 1 if self.bias else 0
        attn = d * (h + 2 * kv) * hd + b * (h + 2 * kv) * hd + h * hd * d + b * d
        ffn_in = 2 * d * f + b * 2 * f if self.is_glu else d * f + b * f
        ffn = ffn_in + f * d + b * d
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        norms_per_block = 4 if self.norm_position == "sandwich" else 2
        qk = 2 * hd if self.qk_norm else 0
        block = attn + ffn + norms_per_block * norm + qk
        embed = self.vocab_size * d
        pos = self.max_seq_len * d if self.position == "learned" else 0
        head = 0 if self.tie_embeddings else self.vocab_size * d
        final_norm = norm if self.norm_position != "post" else 0
        total = self.n_layer * block + final_norm + head
        if include_embedding:
            total += embed + pos
        elif self.tie_embeddings:
            total += embed  # the tied matrix still does the LM-head matmul
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6·N_matmul + 12·n_layer·n_head·head_dim·seq (Kaplan/PaLM, causal not halved)."""
        n_matmul = self.num_params(include_embedding=False)
        return 6 * n_matmul + 12 * self.n_layer * self.n_head * self.head_dim * seq_len
