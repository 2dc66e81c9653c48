"""Checkpoint conversion (`llmtrain convert`) and Hugging Face export (`llmtrain export --format hf`).

  ZeRO folder X.ckpt/ (stage 1/2/3, any world size)  --\
  universal checkpoint folder (below)                 ---+-> consolidated checkpoint -> one .ckpt file (convert)
  single-file Lightning checkpoint (DDP, one device)  --/                           -> HF Llama folder (export)
  ZeRO folder X.ckpt/ ------------------------------------> universal checkpoint folder (convert --universal):
                                                            resumes training on another number of ranks

A consolidated checkpoint is a plain dict that `torch.load(weights_only=True)` accepts: `state_dict` (fp32,
keys `model.<Decoder key>`), `hyper_parameters`, `llmtrain`, the step counters and `converted_from`; the
optimizer, scheduler, loop and callback states are dropped (it is a weights file, not a resume point).
docs/checkpoints.md describes the formats and the weights_only policy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from llmtrain.model import Decoder, ModelConfig

# Top-level entries a consolidated checkpoint keeps; everything else (optimizer_states, lr_schedulers, loops,
# callbacks, datamodule and precision state, DeepSpeed's own bookkeeping) only makes sense for resuming.
KEPT_ENTRIES = ("epoch", "global_step", "pytorch-lightning_version", "hparams_name", "hyper_parameters",
                "datamodule_hyper_parameters", "llmtrain")

# Wrappers that add a level to parameter names: Lightning < 2.1 under DeepSpeed, activation checkpointing,
# torch.compile. load_decoder strips the last two as well.
WRAPPER_PREFIXES = ("_forward_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

ZERO3_RANK0_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3 writes one model states file per rank
RANK0_MODEL_STATES = ("mp_rank_00_model_states.pt", ZERO3_RANK0_MODEL_STATES)

# DeepSpeed's optimizer shards pickle these plain-data classes besides tensors; nothing else is accepted.
DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted or exported; the message says what is wrong and with which file."""


# ------------------------------------------------------------------------------------------- reading checkpoints


def load_consolidated(src: str) -> dict[str, Any]:
    """The consolidated checkpoint dict (see the module docstring) of a ZeRO or universal checkpoint folder or a
    single-file checkpoint."""
    path = Path(src)
    if not path.exists():
        old = path.with_name(f".old.{path.name}")
        hint = f" ({old} exists: a save was interrupted, pass that folder)" if old.exists() else ""
        raise FileNotFoundError(f"checkpoint {src}: no such file or folder{hint}")
    if is_universal(path) and not (path / "latest").is_file():
        checkpoint, origin = _read_universal_folder(path)
    elif path.is_dir():
        checkpoint, origin = _read_zero_folder(path)
    else:
        checkpoint, origin = _read_lightning_file(path)
    if not isinstance(checkpoint.get("hyper_parameters"), dict) or "config" not in checkpoint["hyper_parameters"]:
        raise CheckpointError(f"{src}: no hyper_parameters['config'] (the ModelConfig): not a llmtrain "
                              "LanguageModel checkpoint")
    consolidated = {key: _plain(checkpoint[key], key) for key in KEPT_ENTRIES if key in checkpoint}
    consolidated["state_dict"] = _fp32_state_dict(checkpoint["state_dict"])
    consolidated["converted_from"] = {"path": str(path.resolve()), **origin}
    check_state_dict(consolidated["state_dict"], model_config(consolidated), src)
    return consolidated


def _read_lightning_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        # mmap: optimizer states in the file are never read from disk, only their pickled structure.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise CheckpointError(f"{path}: not a Lightning checkpoint that loads with torch.load(weights_only=True): "
                              f"{_first_line(error)}") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry)")
    return checkpoint, {"format": "lightning"}


def _read_zero_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """DeepSpeed's own gathering (zero_to_fp32) for the fp32 weights; Lightning's entries from rank 0's file."""
    tag_dir, client_state = _verified_zero_folder(folder)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its progress; keep stdout for results
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag_dir.name)
    return _deepspeed_checkpoint(client_state, state_dict, tag_dir, "deepspeed")


def _deepspeed_checkpoint(client_state: dict[str, Any], state_dict: dict[str, Tensor], tag_dir: Path,
                          fmt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Lightning's entries of rank 0's model states with `state_dict`, and where they came from."""
    checkpoint = {key: client_state[key] for key in KEPT_ENTRIES if key in client_state}
    checkpoint["state_dict"] = state_dict
    zero = client_state.get("ds_config", {}).get("zero_optimization", {})
    origin = {"format": fmt, "zero_stage": zero.get("stage"), "world_size": client_state.get("dp_world_size"),
              "tag": tag_dir.name, "deepspeed_version": client_state.get("ds_version")}
    return checkpoint, origin


def _read_universal_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fp32 weights of a universal checkpoint: one whole (flattened) tensor per parameter in
    `<tag>/zero/<name>/fp32.pt`, shaped by rank 0's `param_shapes`; Lightning's entries from that same file."""
    tag_dir = folder / (folder / UNIVERSAL_LATEST).read_text().strip()
    rank0 = next((tag_dir / name for name in RANK0_MODEL_STATES if (tag_dir / name).is_file()), None)
    if rank0 is None:
        raise CheckpointError(f"{folder}: a universal checkpoint without a rank-0 model states file "
                              f"({' or '.join(RANK0_MODEL_STATES)}) in {tag_dir}")
    client_state = _load_checked(rank0)
    shapes = {name: shape for group in client_state.get("param_shapes") or [] for name, shape in group.items()}
    if not shapes:
        raise CheckpointError(f"{rank0}: no param_shapes: not a model states file DeepSpeed wrote")
    state_dict = {}
    for name, shape in shapes.items():
        file = tag_dir / "zero" / name / "fp32.pt"
        if not file.is_file():
            raise CheckpointError(f"{folder}: no {file.relative_to(folder)}: the universal checkpoint is incomplete "
                                  "(convert the ZeRO folder again)")
        value = _load_checked(file)
        value = value["param"] if isinstance(value, dict) else value  # DeepSpeed writes either form
        if value.numel() != math.prod(shape):
            raise CheckpointError(f"{file}: {value.numel()} values for a parameter of shape {tuple(shape)}")
        state_dict[name] = value.reshape(shape)
    module = client_state.get("module") or {}
    state_dict.update({name: module[name] for name in client_state.get("buffer_names") or [] if name in module})
    return _deepspeed_checkpoint(client_state, state_dict, tag_dir, "deepspeed-universal")


def _load_checked(file: Path) -> Any:
    """torch.load(weights_only=True) with DeepSpeed's plain-data classes allowed, or an error naming the file."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise CheckpointError(f"{file}: refused, it does not load with torch.load(weights_only=True) "
                                  f"and DeepSpeed's plain-data classes: {_first_line(error)}") from error


def _verified_zero_folder(folder: Path) -> tuple[Path, dict[str, Any]]:
    """The tag folder of a ZeRO checkpoint and rank 0's model states (Lightning's entries), once every file is
    proven to hold nothing but tensors, containers and DeepSpeed's plain-data classes: DeepSpeed's own readers
    unpickle with weights_only=False, and after this check that runs no foreign code."""
    tag_dir = _zero_tag_dir(folder)
    model_files = sorted(tag_dir.glob("*_model_states.pt"))
    optim_files = sorted(tag_dir.glob("*_optim_states.pt"))
    if not optim_files:
        raise CheckpointError(f"{folder}: no *_optim_states.pt in {tag_dir}: the fp32 weights of a ZeRO "
                              "checkpoint live in its optimizer shards")
    if any("mp_rank_00" not in f.name for f in model_files + optim_files):
        raise CheckpointError(f"{folder}: holds model-parallel shards (mp_rank > 0), which convert does not merge")
    # Rank 0's model states hold Lightning's entries: mp_rank_00_... for ZeRO-1/2, zero_pp_rank_0_... for ZeRO-3.
    rank0 = next((f for f in model_files if f.name in RANK0_MODEL_STATES), None)
    if rank0 is None:
        raise CheckpointError(f"{folder}: no rank-0 model states file ({' or '.join(RANK0_MODEL_STATES)}) "
                              f"in {tag_dir}")
    client_state: dict[str, Any] = {}
    for file in model_files + optim_files:
        loaded = _load_checked(file)
        if file == rank0:
            client_state = loaded
    return tag_dir, client_state


def zero_world_size(folder: Path) -> Optional[int]:
    """How many data-parallel ranks wrote a ZeRO checkpoint folder (one optimizer shard each); None for a file or
    a folder that is not a DeepSpeed checkpoint."""
    if not folder.is_dir() or not (folder / "latest").is_file():
        return None
    return len(list(_zero_tag_dir(folder).glob("*mp_rank_00_optim_states.pt")))


def _zero_tag_dir(folder: Path) -> Path:
    """The tag folder (Lightning's is `checkpoint`) that `latest` names."""
    latest = folder / "latest"
    if not latest.is_file() and is_universal(folder):
        raise CheckpointError(f"{folder}: a universal checkpoint (made by `llmtrain convert --universal`), not a "
                              "ZeRO folder: pass the ZeRO folder it was made from")
    if not latest.is_file():
        hint = (" (this looks like the tag folder inside one: pass its parent)"
                if any(folder.glob("*_model_states.pt")) else "")
        raise CheckpointError(f"{folder}: a folder, but not a DeepSpeed checkpoint: no 'latest' file{hint}")
    tag_dir = folder / latest.read_text().strip()
    if not tag_dir.is_dir() or not any(tag_dir.glob("*_model_states.pt")):
        raise CheckpointError(f"{folder}: 'latest' names {tag_dir.name!r}, but {tag_dir} holds no "
                              "*_model_states.pt")
    return tag_dir


def _deepspeed_safe_globals() -> list[type]:
    import importlib

    found = []
    for module, name in DEEPSPEED_SAFE_GLOBALS:
        with contextlib.suppress(ImportError, AttributeError):  # older/newer DeepSpeed: fewer classes to allow
            found.append(getattr(importlib.import_module(module), name))
    return found


def _fp32_state_dict(state_dict: dict[str, Any]) -> dict[str, Tensor]:
    """Wrapper prefixes removed, floating tensors in fp32 (bf16 runs keep bf16 weights in single files)."""
    clean = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        for prefix in WRAPPER_PREFIXES:
            key = key.replace(prefix, "")
        clean[key] = value.float() if value.is_floating_point() else value
    return clean


def _plain(value: Any, where: str) -> Any:
    """`value` as types that torch.load(weights_only=True) accepts; anything else is refused by name."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor, torch.dtype, torch.device)):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):  # also AttributeDict and OrderedDict, which become plain dicts
        return {_plain(k, f"{where} key"): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # namedtuples become tuples
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise CheckpointError(f"checkpoint entry {where} is a {type(value).__module__}.{type(value).__qualname__}, "
                          "which a weights_only checkpoint cannot hold")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    unsupported = [line for line in lines if "Unsupported global" in line or "WeightsUnpickler error" in line]
    return (unsupported or lines or [type(error).__name__])[0]


# -------------------------------------------------------------------------------------------------- validation


def model_config(checkpoint: dict[str, Any]) -> ModelConfig:
    """The ModelConfig stored in a checkpoint's hyper_parameters, or an error naming the unknown fields."""
    saved = checkpoint["hyper_parameters"]["config"]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise CheckpointError(f"checkpoint config has fields this llmtrain does not know: {', '.join(unknown)}")
    return ModelConfig(**saved)


def check_state_dict(state_dict: dict[str, Tensor], config: ModelConfig, src: str) -> None:
    """Refuses weights that do not fit `config` (vocab, widths, depth), naming every missing, extra or
    mis-shaped tensor. The Decoder is built on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        expected = {f"model.{k}": tuple(v.shape) for k, v in Decoder(config).state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    problems += [f"{k}: weights {tuple(state_dict[k].shape)} vs config {shape}"
                 for k, shape in expected.items() if k in state_dict and tuple(state_dict[k].shape) != shape]
    if problems:
        raise CheckpointError(f"{src}: weights do not match the checkpoint's model config ("
                              + "; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20
                                                            else "") + ")")


# ----------------------------------------------------------------------------------------------------- convert


def convert_checkpoint(src: str, dst: str) -> Path:
    """Writes the consolidated checkpoint of `src` (ZeRO folder or single file) to the file `dst`, atomically."""
    checkpoint = load_consolidated(src)
    final = Path(dst)
    if final.is_dir():
        raise CheckpointError(f"destination {dst} is a folder; convert writes one file")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".tmp.{final.name}")
    try:
        torch.save(checkpoint, staging)
        torch.load(staging, map_location="cpu", weights_only=True, mmap=True)  # the promise we make, checked
        os.replace(staging, final)
    finally:
        staging.unlink(missing_ok=True)
    return final


# ---------------------------------------------------------------------- universal checkpoint (any world size)

UNIVERSAL_LATEST = "latest_universal"  # DeepSpeed's tag file for a universal checkpoint (`latest` for a plain one)


def is_universal(folder: Path) -> bool:
    """Whether `folder` is a DeepSpeed universal checkpoint (as `convert --universal` writes them)."""
    return folder.is_dir() and (folder / UNIVERSAL_LATEST).is_file()


def convert_to_universal(src: str, dst: str, workers: int = 4) -> Path:
    """Writes DeepSpeed's universal checkpoint of the ZeRO folder `src` into the new folder `dst`, atomically.

    A ZeRO folder holds each rank's slice of the flattened optimizer state, so it resumes only on the world size
    that wrote it. DeepSpeed's ds_to_universal re-cuts it per parameter (`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`,
    whole tensors) and copies the model states files, which carry Lightning's entries (step, loops, schedulers,
    callbacks, data position). ZeroStrategy loads the result on any number of ranks (docs/checkpoints.md).
    """
    folder, final = Path(src), Path(dst)
    if not folder.is_dir():
        raise CheckpointError(f"{src}: not a ZeRO checkpoint folder; a single-file checkpoint (DDP, one device) "
                              "holds whole tensors and already resumes on any world size")
    tag_dir, _ = _verified_zero_folder(folder)
    if final.exists():
        raise CheckpointError(f"destination {dst} exists; convert --universal writes a new folder and overwrites "
                              "nothing")
    from deepspeed.checkpoint import ds_to_universal

    staging = final.with_name(f".tmp.{final.name}")
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier kill
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(staging / tag_dir.name),
                              num_extract_workers=workers, num_merge_workers=max(1, workers // 2),
                              keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # Lightning does not write Megatron's universal info
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its progress; keep stdout for results
            ds_to_universal.main(args)
        (staging / UNIVERSAL_LATEST).write_text(tag_dir.name)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def convert_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmtrain convert",
        description="Consolidate a DeepSpeed ZeRO checkpoint folder (stage 1/2/3, any world size), a universal "
                    "checkpoint folder or a single-file Lightning checkpoint into one fp32 .ckpt file without "
                    "optimizer state; it loads with torch.load(weights_only=True) and works with `llmtrain "
                    "generate` and export.")
    parser.add_argument("src", help="a ZeRO or universal checkpoint folder (X.ckpt/), or a Lightning .ckpt file")
    parser.add_argument("dst", help="the consolidated .ckpt file to write (with --universal: the new folder)")
    parser.add_argument("--universal", action="store_true",
                        help="write DeepSpeed's universal checkpoint of a ZeRO folder instead, with the optimizer "
                             "state, to resume training on another number of GPUs (`llmtrain fit --ckpt_path DST`)")
    parser.add_argument("--workers", type=int, default=4, help="processes for --universal (default 4)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers={args.workers} is invalid: must be >= 1")
    try:
        if args.universal:
            out = convert_to_universal(args.src, args.dst, args.workers)
        else:
            out = convert_checkpoint(args.src, args.dst)
    except (FileNotFoundError, ValueError) as error:
        print(f"llmtrain convert: error: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


# ------------------------------------------------------------------------------------------- Hugging Face export

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
