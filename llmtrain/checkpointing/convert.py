"""`llmtrain convert`: one fp32 weights file from any checkpoint, or a universal checkpoint from a ZeRO folder.

  ZeRO / universal folder or single file --load_consolidated--> one .ckpt file (weights, no optimizer state)
  ZeRO folder X.ckpt/ --DeepSpeed's ds_to_universal--> universal checkpoint folder: resumes on any world size
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path

import torch

from llmtrain.checkpointing.readers import (UNIVERSAL_LATEST, CheckpointError, _verified_zero_folder,
                                            load_consolidated)
from llmtrain.files import write_atomically


def convert_checkpoint(src: str, dst: str) -> Path:
    """Writes the consolidated checkpoint of `src` (ZeRO folder or single file) to the file `dst`, atomically."""
    checkpoint = load_consolidated(src)
    final = Path(dst)
    if final.is_dir():
        raise CheckpointError(f"destination {dst} is a folder; convert writes one file")
    # The promise we make, checked before the file gets its name: it loads with weights_only=True.
    return write_atomically(final, lambda f: torch.save(checkpoint, f),
                            check=lambda path: torch.load(path, map_location="cpu", weights_only=True, mmap=True))



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
