"""`llmtrain export --format hf`: a checkpoint as a Hugging Face folder (config, safetensors, tokenizer) that
transformers loads as LlamaForCausalLM, or Qwen3ForCausalLM when qk_norm is on (hf_arch); the tokenizer encodes and
decodes exactly as the sentencepiece model (hf_tokenizer). Other architectures are refused naming every reason."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

from llmtrain.checkpointing.hf_arch import (hf_architecture, hf_config_dict, hf_state_dict, incompatibilities,
                                            llama_width_problems)
from llmtrain.checkpointing.hf_tokenizer import write_hf_tokenizer
from llmtrain.checkpointing.readers import CheckpointError, load_consolidated, model_config
from llmtrain.model import ModelConfig

NO_TOKENIZER = "none"  # --tokenizer none: export the model alone


def llama_incompatibilities(config: ModelConfig) -> list[str]:
    """Every way `config` differs from what LlamaForCausalLM computes, as 'field=value (...)'; qk_norm is the one
    that Qwen3ForCausalLM holds (export picks it then)."""
    problems = incompatibilities(config)
    if config.qk_norm:
        problems += llama_width_problems(config)
        problems.append("qk_norm=True (Llama attention has no q/k norm; Qwen3ForCausalLM has it, and export "
                        "writes that)")
    return problems


def export_hf(src: str, out_dir: str, tokenizer: Optional[str] = None) -> Path:
    """Writes config.json, model.safetensors (fp32) and the tokenizer of a checkpoint to `out_dir`, which
    transformers loads as LlamaForCausalLM or Qwen3ForCausalLM; refuses other architectures naming every reason,
    and a tokenizer whose Hugging Face version would encode or decode anything differently. `tokenizer`: a folder
    or .model file, "none" for no tokenizer; default the one the checkpoint records."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    checkpoint = load_consolidated(src)  # a ZeRO folder is gathered in memory, no intermediate file
    config = model_config(checkpoint)
    try:
        arch = hf_architecture(config)
    except CheckpointError as error:
        raise CheckpointError(f"{src}: {error}") from None
    final = Path(out_dir)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise CheckpointError(f"output {out_dir} exists and is not an empty folder")
    tokenizer_model = None if tokenizer == NO_TOKENIZER else _tokenizer_model(
        tokenizer or checkpoint.get("llmtrain", {}).get("tokenizer"), explicit=tokenizer is not None)

    staging = final.with_name(f".tmp.{final.name}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        special_ids: dict[str, Optional[int]] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        if tokenizer_model is not None:
            special_ids = write_hf_tokenizer(tokenizer_model, staging, config.vocab_size)
        hf_config = AutoConfig.for_model(arch.model_type, **hf_config_dict(config, arch), **special_ids)
        hf_config.architectures = [arch.name]
        hf_config.dtype = "float32"
        hf_config.save_pretrained(staging)
        save_file(hf_state_dict(checkpoint["state_dict"]), staging / "model.safetensors", metadata={"format": "pt"})
        if final.exists():
            final.rmdir()  # checked empty above
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _tokenizer_model(path: Optional[str], explicit: bool) -> Optional[Path]:
    """The sentencepiece .model file of a tokenizer folder (tokenizer.model, or its only *.model) or file."""
    source = "--tokenizer" if explicit else "the checkpoint's llmtrain['tokenizer']"
    if path is None:
        warnings.warn("the checkpoint records no tokenizer and none was given (--tokenizer DIR): exporting the "
                      "model without one, bos/eos ids unset (--tokenizer none says so on purpose)", stacklevel=3)
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


def export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmtrain export",
        description="Export a checkpoint (ZeRO or universal folder, or .ckpt file) as a Hugging Face folder: "
                    "config.json, model.safetensors, tokenizer. LlamaForCausalLM, or Qwen3ForCausalLM with qk_norm; "
                    "other architectures, and a tokenizer that would not encode and decode exactly as "
                    "sentencepiece, are refused with the reasons.")
    parser.add_argument("src", help="a ZeRO or universal checkpoint folder, or a .ckpt file")
    parser.add_argument("--format", choices=["hf"], default="hf",
                        help="output format (hf: LlamaForCausalLM or Qwen3ForCausalLM)")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder or .model file, or 'none' for no tokenizer; default: the one "
                             "recorded in the checkpoint")
    args = parser.parse_args(argv)
    try:
        out = export_hf(args.src, args.out, args.tokenizer)
    except (FileNotFoundError, ValueError) as error:
        print(f"llmtrain export: error: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0
