"""Durable file writes, shared by checkpoints and token shards: a file gets its final name only once it is whole
and on disk, so a kill at any instant leaves the old version or the new one, never a truncated file."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Optional


def write_atomically(final: Path, write: Callable[[BinaryIO], None],
                     check: Optional[Callable[[Path], None]] = None, unique: bool = False) -> Path:
    """Calls write(file) on `.tmp.<name>` beside `final` (same filesystem, so the rename is atomic), fsyncs it, runs
    `check(temp path)` if given, renames it onto `final` and fsyncs the folder. The temp file never outlives a
    failure of this process; a kill leaves it as a hidden `.tmp.` file that every reader of ours ignores, and the
    next write of `final` replaces it. `unique` adds the pid and a random suffix to the temp name, for files that
    several processes may write at once (metadata and caches on a shared filesystem)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".{os.getpid()}.{secrets.token_hex(4)}" if unique else ""
    staging = final.with_name(f".tmp.{final.name}{suffix}")
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


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    """`data` as the whole content of `path`, atomically; safe when several processes write the same file."""
    return write_atomically(Path(path), lambda f: f.write(data), unique=True)


def fsync_folder(folder: Path) -> None:
    """Makes a rename in `folder` durable (POSIX: the entry lives in the folder's own data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
