"""The decoder-only Transformer: token embedding -> n_layer Blocks -> final norm -> LM head.

Plain torch.nn: precision, parallelism, compile and activation checkpointing are applied from outside.
Every architecture switch lives in ModelConfig and is resolved here through a table (NORMS, FFNS, POSITIONS,
RESIDUALS, ATTENTION_BACKENDS), so the forward pass reads the same for every variant.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmtrain.model.attention import Attention, build_attention_kernel, soft_cap
from llmtrain.model.config import ModelConfig
from llmtrain.model.ffn import build_ffn
from llmtrain.model.norms import NORM_TYPES, build_norm
from llmtrain.model.position import PositionContext, PositionEncoding, build_position

Sublayer = Callable[[Tensor], Tensor]


# Where the norms sit around a sublayer f (attention or FFN); out_norm is nn.Identity except for sandwich.
def pre_norm(x: Tensor, f: Sublayer, norm: nn.Module, out_norm: nn.Module) -> Tensor:
    return x + f(norm(x))  # GPT-2, Llama: the residual stream itself is never normalized


def post_norm(x: Tensor, f: Sublayer, norm: nn.Module, out_norm: nn.Module) -> Tensor:
    return norm(x + f(x))  # original Transformer (Vaswani et al. 2017); needs warmup to train deep


def sandwich_norm(x: Tensor, f: Sublayer, norm: nn.Module, out_norm: nn.Module) -> Tensor:
    return x + out_norm(f(norm(x)))  # CogView (Ding et al. 2021), Gemma 2: bounds what each sublayer adds


RESIDUALS: dict[str, Callable[[Tensor, Sublayer, nn.Module, nn.Module], Tensor]] = {
    "pre": pre_norm,
    "post": post_norm,
    "sandwich": sandwich_norm,
}


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.residual = RESIDUALS[config.norm_position]
        sandwich = config.norm_position == "sandwich"
        self.attn_norm = build_norm(config, config.d_model)
        self.attn = Attention(config)
        self.attn_out_norm = build_norm(config, config.d_model) if sandwich else nn.Identity()
        self.ffn_norm = build_norm(config, config.d_model)
        self.ffn = build_ffn(config)
        self.ffn_out_norm = build_norm(config, config.d_model) if sandwich else nn.Identity()

    def forward(self, x: Tensor, positions: PositionContext) -> Tensor:  # (B, T, d_model) -> (B, T, d_model)
        # attn is called with positional args so a forward-pre-hook sees them (the stability probe does).
        x = self.residual(x, lambda h: self.attn(h, positions), self.attn_norm, self.attn_out_norm)
        return self.residual(x, self.ffn, self.ffn_norm, self.ffn_out_norm)


def _init_normal(module: nn.Linear | nn.Embedding, std: float) -> None:
    nn.init.normal_(module.weight, mean=0.0, std=std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.position = build_position(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # Post-norm already ends every block with a norm; the others normalize the residual stream once more.
        self.final_norm = nn.Identity() if config.norm_position == "post" else build_norm(config, config.d_model)
        # Tied: the head reuses tok_embeddings.weight (Press & Wolf 2017), see head().
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, gather: Callable[[list[nn.Parameter]], ContextManager] = lambda params: nullcontext()
                         ) -> None:
        """normal(0, init_std) for every Linear and Embedding, zero biases, unit norm weights; the output
        projections (attn out_proj, ffn down_proj) get init_std / sqrt(2·n_layer): each of the 2·n_layer
        sublayers adds into the residual stream, and this keeps its variance from growing with depth
        (GPT-2 §2.3, Llama/OLMo practice). Safe to call after building on the meta device (rebuilds fixed tables).

        `gather(params)` makes one module's parameters whole while it is initialised. Under DeepSpeed ZeRO-3
        (deepspeed.zero.Init) each module's parameters are partitioned as soon as it is built, so the init in
        __init__ writes into empty shards and the model would keep torch's default init (50x larger weights):
        call again with deepspeed.zero.GatheredParameters(params, modifier_rank=0). One module at a time, so
        no GPU ever holds more than one module's full weights."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layer)
        residual_outputs = {id(m) for block in self.blocks for m in (block.attn.out_proj, block.ffn.down_proj)}
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with gather(list(module.parameters())):
                    _init_normal(module, out_std if id(module) in residual_outputs else std)
            elif isinstance(module, (*NORM_TYPES, PositionEncoding)):
                with gather(list(module.parameters())):
                    module.reset_parameters()

    def trunk(self, input_ids: Tensor, document_ids: Optional[Tensor] = None,
              position_ids: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, T) -> hidden states (B, T, d_model) after the final norm.

        document_ids (B, T): tokens attend only within their own document (block-diagonal causal).
        position_ids (B, T): positions for rope/learned/sinusoidal/alibi (restarting per document); default 0..T-1.
        """
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length T={T} exceeds max_seq_len={self.config.max_seq_len}")
        for name, ids in (("document_ids", document_ids), ("position_ids", position_ids)):
            if ids is not None and ids.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(ids.shape)}, input_ids has {tuple(input_ids.shape)}")
        positions = torch.arange(T, device=input_ids.device)[None] if position_ids is None else position_ids

        h = self.tok_embeddings(input_ids)  # (B, T, d_model)
        if self.config.scale_embeddings:
            h = h * math.sqrt(self.config.d_model)
        h = self.position.embed(h, positions)
        ctx = self.position.context(positions, document_ids)  # rope tables / alibi slopes, once for all layers
        ctx.kernel = build_attention_kernel(self.config, ctx, B, h.dtype)  # masks, once for all layers
        for block in self.blocks:
            h = block(h, ctx)
        return self.final_norm(h)

    def head(self, hidden: Tensor) -> Tensor:
        """hidden (B, T, d_model) -> logits (B, T, vocab_size), soft-capped when final_logit_softcap is set."""
        # The untied head is called as a module so that module hooks (e.g. ZeRO-3 parameter gathering) fire.
        logits = self.lm_head(hidden) if self.lm_head is not None else F.linear(hidden, self.tok_embeddings.weight)
        return soft_cap(logits, self.config.final_logit_softcap)

    def forward(self, input_ids: Tensor, document_ids: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tensor:  # (B, T) -> (B, T, vocab_size)
        return self.head(self.trunk(input_ids, document_ids, position_ids))
