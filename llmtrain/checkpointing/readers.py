"""Reading checkpoints of every format llmtrain writes, with the safety checks in one place.

  ZeRO folder X.ckpt/ (stage 1/2/3, any world size)  --\
  universal checkpoint folder (convert --universal)   ---+-> consolidated checkpoint (load_consolidated)
  single-file Lightning checkpoint (DDP, one device)  --/

A consolidated checkpoint is a plain dict that `torch.load(weights_only=True)` accepts: `state_dict` (fp32,
keys `model.<Decoder key>`), `hyper_parameters`, `llmtrain`, the step counters and `converted_from`; the
optimizer, scheduler, loop and callback states are dropped (it is a weights file, not a resume point).
Every file is loaded with weights_only=True before anything else (DeepSpeed's own readers) touches it;
docs/checkpoints.md describes the formats and the policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from llmtrain.model import Decoder, ModelConfig

# callbacks, datamodule and precision state, DeepSpeed's own bookkeeping) only makes sense for resuming.
KEPT_ENTRIES = ("epoch", "global_step", "pytorch-lightning_version", "hparams_name", "hyper_parameters",
                "datamodule_hyper_parameters", "llmtrain")

# Wrappers that add a level to parameter names: Lightning < 2.1 under DeepSpeed, activation checkpointing,
# torch.compile of a module.
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



UNIVERSAL_LATEST = "latest_universal"  # DeepSpeed's tag file for a universal checkpoint (`latest` for a plain one)


def is_universal(folder: Path) -> bool:
    """Whether `folder` is a DeepSpeed universal checkpoint (as `convert --universal` writes them)."""
    return folder.is_dir() and (folder / UNIVERSAL_LATEST).is_file()


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
    tag_dir = tag_folder(folder, UNIVERSAL_LATEST)
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
    """The tag folder of a ZeRO checkpoint and rank 0's model states (Lightning's entries), once every file in the
    tag folder is proven to hold nothing but tensors, containers and DeepSpeed's plain-data classes: DeepSpeed's own
    readers unpickle with weights_only=False, and after this check that runs no foreign code."""
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
    for file in tag_files(tag_dir):  # all of them: DeepSpeed's converters pick files by name prefix, recursively
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
    tag_dir = tag_folder(folder, "latest")
    if not any(tag_dir.glob("*_model_states.pt")):
        raise CheckpointError(f"{folder}: 'latest' names {tag_dir.name!r}, but {tag_dir} holds no "
                              "*_model_states.pt")
    return tag_dir


def tag_folder(folder: Path, tag_file: str) -> Path:
    """The tag folder that `folder/tag_file` names, refused unless the name is a plain child folder.

    DeepSpeed joins the tag to the checkpoint folder itself and unpickles what it finds with weights_only=False, and
    its zero_to_fp32 takes the tag's last part only: a tag like `decoy/checkpoint`, `..` or a link out of the folder
    would make what DeepSpeed loads differ from what our weights_only check read. A plain name is one folder for
    everyone."""
    tag = (folder / tag_file).read_text().strip()
    tag_dir = folder / tag
    if not tag or tag in (".", "..") or any(sep in tag for sep in ("/", "\\", os.sep)) or Path(tag).is_absolute():
        raise CheckpointError(f"{folder / tag_file}: names {tag!r}, which is not a plain folder name inside "
                              f"{folder}; refused (DeepSpeed would load files from elsewhere than were checked)")
    if tag_dir.is_symlink() or not tag_dir.is_dir():
        what = "a link" if tag_dir.is_symlink() else "no folder"
        raise CheckpointError(f"{folder / tag_file}: names {tag!r}, but {tag_dir} is {what}; a checkpoint's tag "
                              "must be a real folder inside it")
    return tag_dir


def verify_deepspeed_folder(folder: Path, rank: int = 0, world_size: int = 1) -> None:
    """Proves, before DeepSpeed's engine unpickles a ZeRO or universal checkpoint folder with weights_only=False,
    that every .pt file under the tag folder it will read holds only tensors, containers and DeepSpeed's plain-data
    classes (mmap: the tensors' bytes are not read). With `world_size` > 1 this rank checks every world_size-th file
    from `rank` on: together the ranks check each file once."""
    universal = is_universal(folder) and not (folder / "latest").is_file()
    tag_dir = tag_folder(folder, UNIVERSAL_LATEST) if universal else _zero_tag_dir(folder)
    for file in tag_files(tag_dir)[rank::world_size]:
        _load_checked(file)


def tag_files(tag_dir: Path) -> list[Path]:
    """Every file under a tag folder, sorted; refused if any entry is a link or not a plain file or folder.

    DeepSpeed reads more than a fixed list here: its engine follows `zero/<parameter>/` names of the model, its
    universal loader takes every `*.pt` of those folders, its converters every file whose name starts with
    `mp_rank_`/`zero_pp_rank_`/`layer_`, at any depth. Checking every file, with no link that could lead elsewhere
    (a linked folder is neither listed by a glob nor walked into), makes what DeepSpeed may read a subset of what was
    checked; DeepSpeed writes nothing else there."""
    files = []
    for root, dirs, names in os.walk(tag_dir):  # does not walk into linked folders: they are refused below
        for entry in [Path(root) / name for name in dirs + names]:
            if entry.is_symlink() or not (entry.is_dir() or entry.is_file()):
                what = f"a link to {os.readlink(entry)}" if entry.is_symlink() else "not a plain file"
                raise CheckpointError(f"{entry}: {what}; a checkpoint's tag folder holds only its own files and "
                                      "folders (refused before DeepSpeed reads anything)")
        files += [Path(root) / name for name in names]
    return sorted(files)


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
        clean[unwrapped_name(key)] = value.float() if value.is_floating_point() else value
    return clean


def unwrapped_name(name: str) -> str:
    """A parameter name with every wrapper prefix removed (blocks.0._checkpoint_wrapped_module.attn.x ->
    blocks.0.attn.x)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


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


def load_decoder(path: str) -> tuple[Decoder, dict[str, Any]]:
    """A Decoder (fp32, CPU) with the weights of any checkpoint load_consolidated reads, and that consolidated dict."""
    checkpoint = load_consolidated(path)
    model = Decoder(model_config(checkpoint))
    model.load_state_dict({k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()})
    return model, checkpoint
