"""What `llmtrain fit --ckpt_path` resumes from: `last` made robust, and checkpoints the run's strategy cannot load
(another strategy, ZeRO stage family or world size) refused before anything is loaded."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Optional

from llmtrain.checkpointing.readers import (UNIVERSAL_LATEST, ZERO3_RANK0_MODEL_STATES, CheckpointError, is_universal,
                                            tag_folder, zero_world_size)


def newest_checkpoint(folders: list[Path]) -> Optional[Path]:
    """The checkpoint `--ckpt_path last` means: last.ckpt's target, else the newest step checkpoint, skipping (and
    naming on stderr) every candidate that is not whole; None when there is none (a fresh start).

    Lightning alone would start from scratch with only a warning when last.ckpt is missing (a kill between removing
    the old link and making the new one), and would crash on a truncated file; a requeued job must never silently
    restart, and must resume from the newest checkpoint that is whole.
    """
    candidates: list[Path] = []
    for folder in folders:
        candidates += [folder / "last.ckpt"] + sorted(folder.glob("step*.ckpt"), reverse=True)
    for path in candidates:
        if not path.exists() and not path.is_symlink():
            continue
        problem = unreadable(path)
        if problem is None:
            return path
        print(f"--ckpt_path last: skipping {path}: {problem}", file=sys.stderr)
    return None


def unreadable(path: Path) -> Optional[str]:
    """Why `path` is not a whole checkpoint (a cheap structural check, no tensor is read), or None."""
    if path.is_symlink() and not path.exists():
        return f"a link to {path.readlink()}, which does not exist"
    if path.is_dir():
        tag_file = "latest" if (path / "latest").is_file() else UNIVERSAL_LATEST if is_universal(path) else None
        if tag_file is None:
            return "a folder without DeepSpeed's 'latest' file (an interrupted save?)"
        try:
            tag_dir = tag_folder(path, tag_file)
        except CheckpointError as error:
            return str(error)
        return None if any(tag_dir.glob("*model_states.pt")) else f"{tag_dir} holds no model states file"
    # torch.save writes a zip archive whose central directory comes last: a truncated file has none.
    if not zipfile.is_zipfile(path):
        return "not a whole checkpoint file (truncated by a kill during a save?)"
    return None


def refuse_checkpoint_of_another_strategy(path: Path, zero_run: bool, strategy: str) -> None:
    """A ZeRO folder resumes only under ZeroStrategy, a single file only without DeepSpeed: say so before the run
    starts, not as Lightning's IsADirectoryError or "not a valid DeepSpeed checkpoint" after setup."""
    if path.is_dir() and not zero_run:
        raise SystemExit(
            f"error: --ckpt_path {path} is a DeepSpeed ZeRO checkpoint folder, but this run's strategy is {strategy}: "
            f"resume it under the ZeRO config that wrote it (--config configs/deepspeed/zero<stage>.yaml), or take "
            f"its weights with `llmtrain convert {path} model.ckpt`")
    if path.is_file() and zero_run:
        raise SystemExit(
            f"error: --ckpt_path {path} is a single-file checkpoint (DDP or one device), but this run uses DeepSpeed "
            "ZeRO, which resumes only its own checkpoint folders: resume it without the ZeRO config")


def check_stage(folder: Path, stage: int) -> None:
    """Refuses a ZeRO-3 folder under ZeRO-1/2 and the reverse: their model states files differ (one per rank,
    with partitioned parameters, under ZeRO-3), and DeepSpeed would fail on a missing file."""
    tag_file = folder / ("latest" if (folder / "latest").is_file() else UNIVERSAL_LATEST)
    if not folder.is_dir() or not tag_file.is_file():
        return  # not a DeepSpeed folder: Lightning/DeepSpeed report it
    saved_stage3 = (folder / tag_file.read_text().strip() / ZERO3_RANK0_MODEL_STATES).is_file()
    if saved_stage3 != (stage == 3):
        saved = "ZeRO-3" if saved_stage3 else "ZeRO-1/2"
        raise ValueError(f"{folder}: written under {saved}, this run uses ZeRO-{stage}: resume with the stage that "
                         f"wrote it, or `llmtrain convert {folder} model.ckpt` for its fp32 weights in one file")


def check_world_size(folder: Path, world_size: int) -> None:
    """Refuses, before DeepSpeed loads anything, a ZeRO checkpoint written by another number of ranks: its
    optimizer state is partitioned per rank, and DeepSpeed cannot re-partition it (it raises only after loading
    the model states; ZeRO-3 fails on missing shard files). A DDP checkpoint holds whole tensors and resumes on
    any world size."""
    saved = zero_world_size(folder)
    if saved is not None and saved != world_size:
        raise ValueError(
            f"{folder}: this ZeRO checkpoint was written by {saved} ranks, this run has {world_size}. ZeRO "
            f"partitions the optimizer state per rank and cannot resume on another world size: resume with "
            f"trainer.devices x trainer.num_nodes = {saved}, or convert it once to DeepSpeed's universal "
            f"checkpoint, which resumes on any world size: `llmtrain convert --universal {folder} "
            f"{universal_path(folder)}`, then --ckpt_path that "
            "folder (or set trainer.strategy.init_args.reshard_on_resume=true to have it done on resume).")


def universal_path(folder: Path) -> Path:
    """Where the universal copy of a ZeRO folder goes: beside it, `step0000100.ckpt` -> `step0000100-universal.ckpt`."""
    return folder.with_name(folder.name.removesuffix(".ckpt") + "-universal.ckpt")
