"""What `llmtrain fit --ckpt_path` resumes from: `last` made robust, and checkpoints the run's strategy cannot load
refused before the run starts."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Optional

from llmtrain.checkpointing.readers import CheckpointError, UNIVERSAL_LATEST, is_universal, tag_folder


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
