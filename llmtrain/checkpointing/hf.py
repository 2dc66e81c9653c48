"""`llmtrain export --format hf`: a Llama-compatible checkpoint as a Hugging Face folder (config, safetensors,
tokenizer) that transformers loads as LlamaForCausalLM; other architectures are refused naming every reason."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from llmtrain.checkpointing.readers import CheckpointError, _first_line, load_consolidated, model_config
from llmtrain.model import ModelConfig


# What transformers' LlamaForCausalLM computes, field by field: value it needs, and why a different one differs.
LLAMA_REQUIREMENTS: dict[str, tuple[Any, str]] = {
    "norm": ("rmsnorm", "LlamaRMSNorm is the only norm"),
    "norm_position": ("pre", "each layer normalizes the sublayer input and adds the raw output to the residual"),
    "bias": (False, "q/k/v/o and MLP biases would need attention_bias/mlp_bias, and LlamaRMSNorm has no bias"),
    "ffn": ("swiglu", "LlamaMLP is down(silu(gate(x)) * up(x))"),
    "position": ("rope", "Llama has no position input other than RoPE"),
    "qk_norm": (False, "Llama attention has no q/k norm"),
    "attn_logit_softcap": (None, "Llama attention has no logit soft-cap"),
    "final_logit_softcap": (None, "LlamaForCausalLM has no final logit soft-cap"),
}

# Decoder state-dict key (after `model.`) -> Hugging Face Llama key.
HF_KEYS: tuple[tuple[str, str], ...] = (
    (r"tok_embeddings\.weight", "model.embed_tokens.weight"),
    (r"blocks\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blocks\.(\d+)\.attn\.([qkv])_proj\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"blocks\.(\d+)\.attn\.out_proj\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blocks\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blocks\.(\d+)\.ffn\.(gate|up|down)_proj\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
    (r"final_norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
)

# Strings the exported HF tokenizer must encode exactly as sentencepiece does; a difference is reported.
TOKENIZER_PROBES = ("The king doth speak.", "Hello world, this is a test of 42 tokens!",
                    "  two  spaces\nand a newline", "héllo wörld ∑ 東京")


def llama_incompatibilities(config: ModelConfig) -> list[str]:
    """Every way `config` differs from what LlamaForCausalLM computes, as 'field=value (Llama needs ...)'."""
    problems = [f"{field}={getattr(config, field)!r} (Llama needs {needed!r}: {why})"
                for field, (needed, why) in LLAMA_REQUIREMENTS.items() if getattr(config, field) != needed]
    if config.d_model % config.n_head != 0:
        problems.append(f"d_model={config.d_model} with n_head={config.n_head} (transformers' LlamaConfig needs "
                        "hidden_size divisible by num_attention_heads)")
    return problems


def hf_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Decoder weights (keys `model.<...>`) under Hugging Face Llama's names; contiguous, unshared copies."""
    out = {}
    for key, value in state_dict.items():
        name = key.removeprefix("model.")
        for pattern, replacement in HF_KEYS:
            if re.fullmatch(pattern, name):
                out[re.sub(pattern, replacement, name)] = value.detach().to(torch.float32).contiguous().clone()
                break
        else:
            raise CheckpointError(f"no Hugging Face Llama name for weight {key!r}")
    return out


def export_hf(src: str, out_dir: str, tokenizer: Optional[str] = None) -> Path:
    """Writes config.json, model.safetensors (fp32) and the tokenizer of a Llama-compatible checkpoint to
    `out_dir`, which transformers loads as LlamaForCausalLM; refuses other architectures naming every reason."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    checkpoint = load_consolidated(src)  # a ZeRO folder is gathered in memory, no intermediate file
    config = model_config(checkpoint)
    problems = llama_incompatibilities(config)
    if problems:
        raise CheckpointError(f"{src}: cannot export to Hugging Face Llama: " + "; ".join(problems))
    final = Path(out_dir)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise CheckpointError(f"output {out_dir} exists and is not an empty folder")
    tokenizer_model = _tokenizer_model(tokenizer or checkpoint.get("llmtrain", {}).get("tokenizer"),
                                       explicit=tokenizer is not None)

    staging = final.with_name(f".tmp.{final.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        special_ids: dict[str, Optional[int]] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        if tokenizer_model is not None:
            special_ids = _write_tokenizer(tokenizer_model, staging, config.vocab_size)
        hf_config = LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.d_model,
            intermediate_size=config.d_ff,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            num_key_value_heads=config.n_kv_head,
            head_dim=config.head_dim,
            hidden_act="silu",
            max_position_embeddings=config.max_seq_len,
            rms_norm_eps=config.norm_eps,
            tie_word_embeddings=config.tie_embeddings,
            attention_bias=False,
            mlp_bias=False,
            initializer_range=config.init_std,
            **_rope_settings(LlamaConfig, config.rope_theta),
            **special_ids,
        )
        hf_config.architectures = ["LlamaForCausalLM"]
        hf_config.dtype = "float32"
        hf_config.save_pretrained(staging)
        save_file(hf_state_dict(checkpoint["state_dict"]), staging / "model.safetensors", metadata={"format": "pt"})
        if final.exists():
            final.rmdir()  # checked empty above
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _rope_settings(config_class: type, theta: float) -> dict[str, Any]:
    # transformers >= 5 groups RoPE settings in `rope_parameters`; 4.x takes `rope_theta` directly.
    if "rope_parameters" in config_class().to_dict():
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


def _tokenizer_model(path: Optional[str], explicit: bool) -> Optional[Path]:
    """The sentencepiece .model file of a tokenizer folder (tokenizer.model, or its only *.model) or file."""
    source = "--tokenizer" if explicit else "the checkpoint's llmtrain['tokenizer']"
    if path is None:
        warnings.warn("the checkpoint records no tokenizer and none was given (--tokenizer DIR): exporting the "
                      "model without one, bos/eos ids unset", stacklevel=3)
        return None
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if not candidate.is_dir():
        raise FileNotFoundError(f"tokenizer {path} (from {source}): no such file or folder"
                                + ("" if explicit else "; pass --tokenizer DIR"))
    models = [candidate / "tokenizer.model"] if (candidate / "tokenizer.model").is_file() else \
        sorted(candidate.glob("*.model"))
    if len(models) != 1:
        raise CheckpointError(f"tokenizer folder {path} (from {source}) holds {len(models)} *.model files; "
                              "expected tokenizer.model or exactly one sentencepiece .model")
    return models[0]


def _write_tokenizer(model_file: Path, out: Path, vocab_size: int) -> dict[str, Optional[int]]:
    """Copies the sentencepiece model as tokenizer.model and has transformers build LlamaTokenizer files from
    it (tokenizer.json, tokenizer_config.json); returns the bos/eos/pad ids for config.json."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    if sp.vocab_size() > vocab_size:
        raise CheckpointError(f"tokenizer {model_file} has {sp.vocab_size()} pieces, more than the model's "
                              f"vocab_size={vocab_size}: its ids would index past the embedding")
    shutil.copyfile(model_file, out / "tokenizer.model")
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}  # -1 = none
    try:
        from transformers import LlamaTokenizer

        specials = {f"{name}_token": sp.id_to_piece(i) for name, i in ids.items() if i >= 0}
        hf_tokenizer = LlamaTokenizer.from_pretrained(str(out), **specials)
        hf_tokenizer.save_pretrained(str(out))
    except Exception as error:  # transformers' sentencepiece conversion varies by version; the .model stays
        warnings.warn(f"transformers could not build a LlamaTokenizer from {model_file} ({_first_line(error)}); "
                      "exported tokenizer.model only", stacklevel=3)
    else:
        # Only probes the vocabulary covers: characters sentencepiece maps to <unk> say nothing about the match.
        probes = [text for text in TOKENIZER_PROBES if sp.unk_id() not in sp.encode(text)]
        differing = [text for text in probes if hf_tokenizer.encode(text, add_special_tokens=False) != sp.encode(text)]
        if differing:
            warnings.warn(f"the exported Hugging Face tokenizer encodes {len(differing)} of {len(probes)} probe "
                          f"strings differently from sentencepiece (e.g. {differing[0]!r}); tokenizer.model is "
                          "the reference", stacklevel=3)
    return {f"{name}_token_id": (i if i >= 0 else None) for name, i in ids.items() if name != "unk"}


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmtrain export",
        description="Export a Llama-compatible checkpoint (ZeRO or universal folder, or .ckpt file) as a Hugging "
                    "Face folder: config.json, model.safetensors, tokenizer. Other architectures are refused with "
                    "the reasons.")
    parser.add_argument("src", help="a ZeRO or universal checkpoint folder, or a .ckpt file")
    parser.add_argument("--format", choices=["hf"], default="hf", help="output format (hf: LlamaForCausalLM)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or .model file; default: the one recorded in the checkpoint")
    args = parser.parse_args(argv)
    try:
        out = export_hf(args.src, args.out, args.tokenizer)
    except (FileNotFoundError, ValueError) as error:
        print(f"llmtrain export: error: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0
