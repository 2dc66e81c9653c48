"""Durable file writes, shared by checkpoints and token shards: a file gets its final name only once it is whole
and on disk, so a kill at any instant leaves the old version or the new one, never a truncated file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, Optional


def write_atomically(final: Path, write: Callable[[BinaryIO], None],
                     check: Optional[Callable[[Path], None]] = None) -> Path:
    """Calls write(file) on `.tmp.<name>` beside `final` (same filesystem, so the rename is atomic), fsyncs it, runs
    `check(temp path)` if given, renames it onto `final` and fsyncs the folder. The temp file never outlives a
    failure of this process; a kill leaves it as a hidden `.tmp.` file that every reader of ours ignores."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".tmp.{final.name}")
    try:
        with open(staging, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(staging)
        os.replace(staging, final)
    finally:
        staging.unlink(missing_ok=True)
    fsync_folder(final.parent)
    return final


def fsync_folder(folder: Path) -> None:
    """Makes a rename in `folder` durable (POSIX: the entry lives in the folder's own data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
