"""Shard verification: every shard's sha256 against the one `llmtrain prepare` recorded, cached by file identity.

A flipped byte that stays inside the vocabulary is invisible to the reader's checks (sizes, index structure,
token id < vocab size), and a run would train on it for days. So fit verifies the shards' sha256 before the
first step (TokenDataModule, `data.verify_shards`), and `llmtrain verify SHARDS` does it on demand.

Speed at TB scale: a shard whose hash matched is recorded in a cache with its size, mtime_ns, ctime_ns and
inode, and is not hashed again while all are unchanged; only new, rewritten or copied shards are read. Shards
are hashed by a pool of threads (hashlib releases the GIL on large blocks), so the first check runs at disk
speed or at n_threads x one core's sha256 rate, whichever is lower (measured rates: docs/data.md). What the
cache cannot see is a byte that rots in place without touching the file's times: `llmtrain verify --no_cache`
re-reads everything.

The cache lives beside the shards (`.llmtrain-verified.json`) when that folder is writable, else under the
user cache dir (`$XDG_CACHE_HOME` or ~/.cache, `llmtrain/verified/`), keyed by the folder's absolute path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.data.shards import METADATA_FILE, SPLITS, ShardError, ShardFile, read_metadata
from llmtrain.data.tokenizer import json_bytes, sha256_file
from llmtrain.files import write_bytes_atomically

log = logging.getLogger(__name__)

CACHE_FILE = ".llmtrain-verified.json"
CACHE_FORMAT = "llmtrain-verified-shards"
HASH_THREADS = 8


@dataclass
class VerifyReport:
    shards: int = 0
    hashed_bytes: int = 0
    cached: int = 0  # files skipped: unchanged since a verified hash
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def mb_per_second(self) -> float:
        return self.hashed_bytes / 1e6 / max(self.seconds, 1e-9)


def cache_path(data_dir: Path) -> Path:
    """Where the verified-hash cache of `data_dir` lives: beside the shards if writable, else the user cache."""
    data_dir = data_dir.resolve()
    if os.access(data_dir, os.W_OK):
        return data_dir / CACHE_FILE
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmtrain" / "verified"
    return base / f"{hashlib.sha256(str(data_dir).encode()).hexdigest()[:32]}.json"


def _read_cache(path: Path) -> dict[str, list[Any]]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return cache.get("files", {}) if cache.get("format") == CACHE_FORMAT else {}


def _write_cache(path: Path, data_dir: Path, files: dict[str, list[Any]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(path, json_bytes({"format": CACHE_FORMAT, "folder": str(data_dir.resolve()), "files": files}))
    except OSError as e:  # a cache that cannot be written costs time on the next run, never correctness
        log.warning("%s: cannot write the shard hash cache (%s); the next run hashes the shards again", path, e)


def _mismatch(path: Path, expected: str, actual: str) -> str:
    return (f"{path}: sha256 {actual}, but {METADATA_FILE} recorded {expected}: the file is corrupted. Re-run "
            "`llmtrain prepare` with the same --source, --tokenizer and --output (it keeps the shards that "
            "verify and rewrites from this one on), or copy the folder again from a good source")


def verify_folder(data_dir: str | os.PathLike[str], use_cache: bool = True, raise_on_problem: bool = True,
                  threads: int = HASH_THREADS) -> VerifyReport:
    """Check every shard of a prepared folder: sizes, index structure and the sha256 of both files.

    Files unchanged (size, mtime_ns) since a verified hash are skipped when use_cache. Every problem is
    collected; with raise_on_problem the first ones are raised as one ShardError (naming each file, the
    expected and the actual hash, and what to do).
    """
    t0 = time.time()
    data_dir = Path(data_dir)
    meta = read_metadata(data_dir)
    dtype = np.dtype(meta["settings"]["dtype"])
    where = cache_path(data_dir)
    cache = _read_cache(where) if use_cache else {}
    report = VerifyReport()
    to_hash: list[tuple[Path, str, list[Any]]] = []  # (file, expected sha256, cache entry if it verifies)
    for split in SPLITS:
        for record in meta["splits"][split]["shards"]:
            report.shards += 1
            try:
                ShardFile(data_dir, record, dtype).check()
            except ShardError as e:
                report.problems.append(str(e))
                continue
            for name, expected in ((record["file"], record["sha256"]), (record["index"], record["index_sha256"])):
                st = (data_dir / name).stat()
                # ctime and inode too: a copy that keeps size and mtime (rsync -a, cp -p) is hashed again
                entry = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, expected]
                if use_cache and cache.get(name) == entry:
                    report.cached += 1
                else:
                    to_hash.append((data_dir / name, expected, entry))
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(to_hash) or 1))) as pool:
        actual = list(pool.map(lambda item: sha256_file(item[0]), to_hash))
    for (path, expected, entry), digest in zip(to_hash, actual):
        report.hashed_bytes += entry[0]
        if digest == expected:
            cache[path.name] = entry
        else:
            cache.pop(path.name, None)
            report.problems.append(_mismatch(path, expected, digest))
    if to_hash:
        _write_cache(where, data_dir, cache)
    report.seconds = time.time() - t0
    if report.hashed_bytes:
        log.info("%s: verified %d shards; hashed %.1f MB in %.1f s (%.0f MB/s), %d files unchanged since a verified "
                 "hash", data_dir, report.shards, report.hashed_bytes / 1e6, report.seconds, report.mb_per_second,
                 report.cached)
    if raise_on_problem and report.problems:
        more = f" (and {len(report.problems) - 3} more: `llmtrain verify {data_dir}` lists all)" \
            if len(report.problems) > 3 else ""
        raise ShardError("; ".join(report.problems[:3]) + more)
    return report

