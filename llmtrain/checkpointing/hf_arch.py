"""The Hugging Face architectures llmtrain's Decoder maps onto exactly, both ways: which one a ModelConfig needs
(Llama, or Qwen3 when qk_norm is on), the config.json fields, and the weight names.

Qwen3's attention is Llama's plus an RMSNorm over head_dim on q and on k before RoPE, one weight each shared by the
heads, with the model's rms_norm_eps: what `qk_norm` does in llmtrain/model/attention.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from llmtrain.checkpointing.readers import CheckpointError
from llmtrain.model import ModelConfig


@dataclass(frozen=True)
class HFArchitecture:
    name: str  # the transformers class, written to config.json's `architectures`
    model_type: str  # config.json's `model_type`
    qk_norm: bool


LLAMA = HFArchitecture("LlamaForCausalLM", "llama", qk_norm=False)
QWEN3 = HFArchitecture("Qwen3ForCausalLM", "qwen3", qk_norm=True)
ARCHITECTURES = {arch.model_type: arch for arch in (LLAMA, QWEN3)}

# What both architectures compute, field by field: the value needed, why another differs, and which transformers
# architecture (if any) has that switch, for the refusal message. llmtrain exports to none of those.
REQUIREMENTS: dict[str, tuple[Any, str, str]] = {
    "norm": ("rmsnorm", "their only norm is RMSNorm",
             "LayerNorm decoders in transformers (GPTNeoXForCausalLM, OPTForCausalLM) differ in other ways too"),
    "norm_position": ("pre", "each layer normalizes the sublayer input and adds the raw output to the residual",
                      ("Gemma2ForCausalLM has sandwich norms (with (1 + weight) RMSNorm and scaled embeddings); no "
                       "decoder-only architecture in transformers has post-norm")),
    "bias": (False, "their RMSNorm has no bias and their MLP biases need mlp_bias",
             "LlamaForCausalLM with attention_bias=true and mlp_bias=true could hold it (not exported yet)"),
    "ffn": ("swiglu", "their MLP is down(silu(gate(x)) * up(x))",
            "GemmaForCausalLM has GeGLU, GPT2LMHeadModel a GELU MLP (each with other differences)"),
    "position": ("rope", "their only position signal is RoPE",
                 ("BloomForCausalLM and MptForCausalLM have ALiBi, GPT2LMHeadModel learned positions, "
                  "XGLMForCausalLM sinusoids")),
    "scale_embeddings": (False, "their embeddings are not scaled",
                         "GemmaForCausalLM scales embeddings by sqrt(hidden_size) (with other differences)"),
    "attn_logit_softcap": (None, "their attention has no logit soft-cap",
                           "Gemma2ForCausalLM has attn_logit_softcapping (with other differences)"),
    "final_logit_softcap": (None, "they have no final logit soft-cap",
                            "Gemma2ForCausalLM has final_logit_softcapping (with other differences)"),
}


def incompatibilities(config: ModelConfig) -> list[str]:
    """Every field of `config` that neither LlamaForCausalLM nor Qwen3ForCausalLM holds, as 'field=value (why;
    where in transformers such a switch exists)'. Width: Qwen3 is picked with qk_norm, and only Llama needs it."""
    problems = [f"{field}={getattr(config, field)!r} (Llama and Qwen3 need {needed!r}: {why}; {where})"
                for field, (needed, why, where) in REQUIREMENTS.items() if getattr(config, field) != needed]
    return problems + ([] if config.qk_norm else llama_width_problems(config))


def llama_width_problems(config: ModelConfig) -> list[str]:
    """transformers' LlamaConfig refuses hidden_size % num_attention_heads != 0 even with an explicit head_dim
    (Qwen3Config does not)."""
    if config.d_model % config.n_head == 0:
        return []
    return [(f"d_model={config.d_model} with n_head={config.n_head} (transformers' LlamaConfig needs hidden_size "
             "divisible by num_attention_heads, whatever head_dim is; Qwen3Config does not, but export picks Qwen3 "
             "only for qk_norm)")]


def hf_architecture(config: ModelConfig) -> HFArchitecture:
    """The architecture that computes exactly what `config` does (picked by qk_norm), or CheckpointError naming
    every field that neither holds."""
    problems = incompatibilities(config)
    if problems:
        raise CheckpointError("cannot export to Hugging Face LlamaForCausalLM or Qwen3ForCausalLM: "
                              + "; ".join(problems))
    return QWEN3 if config.qk_norm else LLAMA


def hf_config_dict(config: ModelConfig, arch: HFArchitecture) -> dict[str, Any]:
    """config.json's architecture fields for `config` (transformers >= 5 field names)."""
    fields: dict[str, Any] = {
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    }
    if arch is LLAMA:
        fields["mlp_bias"] = False
    else:
        fields["use_sliding_window"] = False
    return fields


# Decoder state-dict key (after `model.`) <-> Hugging Face key, for both architectures (Llama has no q/k norm).
KEY_PAIRS: tuple[tuple[str, str], ...] = (
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blocks.{i}.attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blocks.{i}.attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blocks.{i}.attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blocks.{i}.attn.out_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blocks.{i}.attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("blocks.{i}.attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
    ("blocks.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blocks.{i}.ffn.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blocks.{i}.ffn.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blocks.{i}.ffn.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("final_norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)


def _renamer(source: int) -> list[tuple[re.Pattern[str], str]]:
    """(pattern, replacement) of KEY_PAIRS read from side `source` (0: llmtrain, 1: Hugging Face)."""
    return [(re.compile(re.escape(pair[source]).replace(r"\{i\}", r"(\d+)")), pair[1 - source].replace("{i}", r"\1"))
            for pair in KEY_PAIRS]


TO_HF, FROM_HF = _renamer(0), _renamer(1)


def rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, replacement in table:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    return None


def hf_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Decoder weights (keys `model.<...>`) under Hugging Face names; fp32, contiguous, unshared copies."""
    out = {}
    for key, value in state_dict.items():
        name = rename(key.removeprefix("model."), TO_HF)
        if name is None:
            raise CheckpointError(f"no Hugging Face Llama/Qwen3 name for weight {key!r}")
        out[name] = value.detach().to(torch.float32).contiguous().clone()
    return out
