"""Weights into llmtrain. `llmtrain import HF_DIR OUT.ckpt` writes a local Hugging Face Llama or Qwen3 checkpoint
(config.json + safetensors) as an llmtrain weights file, from which `llmtrain fit --model.init_from OUT.ckpt`
continues pretraining.

The file is a consolidated checkpoint (llmtrain/checkpointing/readers.py): fp32 `state_dict` under the Decoder's
names, `hyper_parameters['config']` (the ModelConfig), `llmtrain['imported_from']`; no optimizer or loop state.
Every config field llmtrain would compute differently (rope scaling, biases, sliding window, another activation,
...) is refused by name before any weight is read.

`load_initial_weights` is what `model.init_from` does with such a file (or any llmtrain checkpoint): the weights
into a freshly built Decoder, the optimizer and schedule left fresh.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import lightning
import torch
from torch import Tensor

from llmtrain.checkpointing.hf_arch import ARCHITECTURES, FROM_HF, HFArchitecture, rename
from llmtrain.checkpointing.readers import CheckpointError, check_state_dict, load_consolidated, model_config
from llmtrain.files import write_atomically
from llmtrain.model import ConfigError, Decoder, ModelConfig

# config.json fields that must hold these values (absent = the transformers default, which is this value), and why.
REQUIRED_VALUES: dict[str, tuple[Any, str]] = {
    "hidden_act": ("silu", "llmtrain's SwiGLU uses silu"),
    "attention_bias": (False, "llmtrain's attention has no bias with RMSNorm"),
    "mlp_bias": (False, "llmtrain's MLP has no bias with RMSNorm"),
    "attention_dropout": (0.0, "llmtrain has no dropout"),
    "pretraining_tp": (1, "tensor-parallel slicing of the MLP changes its numerics"),
    "use_sliding_window": (False, "llmtrain attends to every earlier token"),
    "sliding_window": (None, "llmtrain attends to every earlier token"),
}
ROPE_TYPES = ("default",)  # rope_parameters / rope_scaling types llmtrain computes


def hf_model_config(hf: dict[str, Any], source: str) -> tuple[ModelConfig, HFArchitecture]:
    """The ModelConfig of a Hugging Face config.json dict, or CheckpointError naming every field llmtrain cannot
    reproduce exactly."""
    arch = ARCHITECTURES.get(hf.get("model_type"))
    if arch is None:
        raise CheckpointError(f"{source}: model_type={hf.get('model_type')!r}; llmtrain imports "
                              f"{', '.join(repr(t) for t in ARCHITECTURES)} (LlamaForCausalLM, Qwen3ForCausalLM)")
    problems = [f"{field}={hf[field]!r} ({why}; needs {needed!r})" for field, (needed, why) in REQUIRED_VALUES.items()
                if field in hf and hf[field] != needed]
    if not hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None:
        problems = [p for p in problems if not p.startswith("sliding_window=")]  # set but switched off: harmless
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        problems.append(f"layer_types={sorted(layer_types)} (llmtrain has full attention in every layer)")
    rope, theta = _rope(hf)
    if rope.get("rope_type", rope.get("type", "default")) not in ROPE_TYPES:
        problems.append(f"rope_parameters/rope_scaling={rope} (llmtrain computes rope_type "
                        f"{' or '.join(ROPE_TYPES)} only: no frequency scaling)")
    if problems:
        raise CheckpointError(f"{source}: cannot import exactly: " + "; ".join(problems))
    try:
        config = ModelConfig(
            vocab_size=hf["vocab_size"], max_seq_len=hf["max_position_embeddings"], d_model=hf["hidden_size"],
            n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
            n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            d_ff=hf["intermediate_size"], norm="rmsnorm", norm_position="pre", norm_eps=hf["rms_norm_eps"],
            bias=False, ffn="swiglu", position="rope", rope_theta=theta, qk_norm=arch.qk_norm,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02))
    except KeyError as missing:
        raise CheckpointError(f"{source}: no {missing.args[0]!r} field") from None
    except ConfigError as error:
        raise CheckpointError(f"{source}: {error}") from None
    return config, arch


def _rope(hf: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """(the RoPE settings, theta): transformers >= 5 writes `rope_parameters`, 4.x `rope_theta` + `rope_scaling`."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return rope, float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json (only safetensors "
                              "checkpoints are imported; pytorch_model.bin would need unpickling)")
    weights: dict[str, Tensor] = {}
    for name in files:
        weights.update(load_file(folder / name))
    return weights


def decoder_state_dict(weights: dict[str, Tensor], config: ModelConfig, source: str) -> dict[str, Tensor]:
    """Hugging Face weights under the Decoder's names (`model.<...>`, fp32); refuses unknown names and a tie that the
    weights contradict."""
    out, unknown = {}, []
    for key, value in weights.items():
        if key.endswith("rotary_emb.inv_freq"):  # a derived buffer some checkpoints carry
            continue
        name = rename(key, FROM_HF)
        if name is None:
            unknown.append(key)
        else:
            out[f"model.{name}"] = value.to(torch.float32)
    if unknown:
        raise CheckpointError(f"{source}: weights llmtrain has no place for: {', '.join(sorted(unknown)[:10])}")
    head = out.pop("model.lm_head.weight", None)
    if config.tie_embeddings and head is not None and not torch.equal(head, out["model.tok_embeddings.weight"]):
        raise CheckpointError(f"{source}: tie_word_embeddings=true, but lm_head.weight differs from "
                              "model.embed_tokens.weight: the checkpoint is not tied")
    if not config.tie_embeddings:
        if head is None:
            raise CheckpointError(f"{source}: tie_word_embeddings=false, but there is no lm_head.weight")
        out["model.lm_head.weight"] = head
    check_state_dict(out, config, source)  # names every missing or mis-shaped tensor
    return out


def import_hf(hf_dir: str, out_file: str) -> Path:
    """Writes the llmtrain weights file `out_file` for the Hugging Face checkpoint folder `hf_dir`."""
    folder, out = Path(hf_dir), Path(out_file)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (a local Hugging Face model folder is expected)")
    if out.exists():
        raise CheckpointError(f"output {out_file} exists; choose another name")
    config, arch = hf_model_config(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    state_dict = decoder_state_dict(read_hf_weights(folder), config, str(folder))
    tokenizer = str(folder.resolve()) if (folder / "tokenizer.model").is_file() else None  # export takes it back
    checkpoint = {"state_dict": state_dict, "hyper_parameters": {"config": asdict(config)},
                  # Lightning reads this before any hook when the file is (wrongly) given to --ckpt_path; the hook
                  # then explains that --model.init_from is the way (LanguageModel.on_load_checkpoint).
                  "pytorch-lightning_version": lightning.__version__,
                  "llmtrain": {"imported_from": {"path": str(folder.resolve()), "architecture": arch.name},
                               "tokenizer": tokenizer}}
    return write_atomically(out, lambda f: torch.save(checkpoint, f))


def import_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmtrain import",
        description="Turn a local Hugging Face LlamaForCausalLM or Qwen3ForCausalLM folder (config.json and "
                    "safetensors) into an llmtrain weights file; continue pretraining from it with "
                    "`llmtrain fit --model.init_from OUT.ckpt` (fresh optimizer and schedule). Configs llmtrain "
                    "would compute differently are refused, naming the fields.")
    parser.add_argument("hf_dir", help="the Hugging Face model folder")
    parser.add_argument("out", help="the llmtrain checkpoint file to write (.ckpt)")
    args = parser.parse_args(argv)
    try:
        out = import_hf(args.hf_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"llmtrain import: error: {error}", file=sys.stderr)
        return 1
    print(out)
    config = torch.load(out, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]["config"]
    overrides = " ".join(f"--model.config.{k} {json.dumps(v)}" for k, v in config.items()
                         if v is not None and k not in INIT_FROM_FREE_FIELDS)
    print(f"continue pretraining from it with: llmtrain fit ... --model.init_from {out} {overrides}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------ model.init_from into a run

# ModelConfig fields that do not change what the weights compute: a run may set them differently from the file.
INIT_FROM_FREE_FIELDS = ("attention_backend", "init_std", "ffn_multiple_of")


def initial_weights(path: str, config: ModelConfig) -> dict[str, Tensor]:
    """The Decoder weights (fp32) of any checkpoint load_consolidated reads, refused unless its ModelConfig equals
    `config` in every field but INIT_FROM_FREE_FIELDS; the error names every differing field."""
    checkpoint = load_consolidated(path)
    saved = model_config(checkpoint)
    differing = [f"{f.name}: {getattr(saved, f.name)!r} in the checkpoint, {getattr(config, f.name)!r} in the run"
                 for f in fields(ModelConfig)
                 if f.name not in INIT_FROM_FREE_FIELDS and getattr(saved, f.name) != getattr(config, f.name)]
    if differing:
        raise ConfigError(f"model.init_from={path}: the checkpoint's model config differs from the run's ("
                          + "; ".join(differing) + "); set model.config to the checkpoint's values")
    return {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}


def load_initial_weights(model: Decoder, path: str) -> None:
    """Copies the weights of checkpoint `path` into `model` (built from the same config). Under DeepSpeed ZeRO-3
    (parameters partitioned as built, deepspeed.zero.Init) each parameter is gathered, written by rank 0 and
    partitioned again, one at a time; every rank reads the whole file into CPU memory first."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        model.load_state_dict(initial_weights(path, model.config), strict=True)  # names every missing/extra tensor
        return
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    # Read with zero.Init's patches off (as deepspeed.initialize does inside it): under them every module built,
    # such as the meta Decoder that checks the file's shapes, would be partitioned and have no shapes to check.
    shutdown_init_context()
    try:
        state = initial_weights(path, model.config)
    finally:
        restore_init_context()
    named = dict(model.named_parameters())
    if set(named) != set(state):
        raise CheckpointError(f"model.init_from={path}: parameters {sorted(set(named) ^ set(state))[:10]} are in "
                              "only one of the model and the checkpoint")
    for name, param in named.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.get_rank() == 0:
                with torch.no_grad():
                    param.copy_(state[name])
