"""The on-disk token format: `prepare` (source -> shards), the shard writer, and the memory-mapped reader.

A prepared folder:

    metadata.json          format, version, settings (tokenizer sha256, vocab size, dtype, source, ...),
                           per split: shard records, token / document / raw-byte counts; "complete": true
    tokenizer/             a copy of the tokenizer (tokenizer.model + tokenizer.json): the folder is self-contained
    train_00000.bin ...    flat token ids of whole documents, back to back (uint16 if vocab <= 65536, else uint32)
    train_00000.idx ...    int64 document offsets into the .bin: n_docs + 1 values, 0 first, n_tokens last
    val_00000.bin/.idx     the validation split (whole documents, chosen by `is_validation_document`)

Separators (EOS, BOS) are not stored: the DataModule inserts them when packing, so `add_bos` needs no re-prepare.

Crash safety: a shard is written under a temp name, fsynced, then renamed; metadata.json (rewritten atomically
after every shard) is the only record of which shards are finished, with their sizes and sha256. A re-run
verifies the recorded shards, drops any that do not match, deletes unrecorded leftovers, and continues after
the last finished document of each split. Shard boundaries depend only on the documents and `shard_tokens`,
so a resumed prepare writes the same bytes as an uninterrupted one, whatever `num_proc` is.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import mmap
import os
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from llmtrain.data.sources import Source, SourceStats, check_utf8, is_validation_document, validation_mask
from llmtrain.data.tokenizer import META_FILE, MODEL_FILE, Tokenizer, json_bytes, load_tokenizer, sha256_file
from llmtrain.files import fsync_folder, write_bytes_atomically

log = logging.getLogger(__name__)

FORMAT = "llmtrain-token-shards"
VERSION = 1
METADATA_FILE = "metadata.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000
SHARD_NAME = re.compile(r"^(train|val)_(\d{5})\.(bin|idx)$")
TEMP_NAME = re.compile(r"^\.((train|val)_\d{5}\.(bin|idx)|metadata\.json)\..*tmp$")  # ours, from a crash
# Documents go to the tokenizer processes in chunks of about this many characters (order is kept).
CHUNK_CHARS = 1 << 20
CHUNK_DOCS = 8192


class ShardError(ValueError):
    """A prepared folder or shard is missing, incomplete, corrupted or made for another tokenizer."""


class PrepareError(ValueError):
    """`prepare` cannot run (e.g. the output folder holds a prepare with other settings)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> tuple[str, str]:
    return f"{split}_{index:05d}.bin", f"{split}_{index:05d}.idx"


# ----------------------------------------------------------------------------------------------------------
# writer


class ShardWriter:
    """Writes one split's shards: tokens stream into a temp file, which is renamed only once whole."""

    def __init__(
        self,
        out_dir: Path,
        split: str,
        dtype: np.dtype,
        shard_tokens: int,
        next_index: int,
        on_commit: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.shard_tokens, self.next_index, self.on_commit = shard_tokens, next_index, on_commit
        self._file: Any = None

    def _open(self, first_doc: int) -> None:
        self._bin_name, self._idx_name = shard_name(self.split, self.next_index)
        self._tmp = self.out_dir / f".{self._bin_name}.tmp"
        self._file = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self._tokens = self._bytes = 0
        self._first_doc = self._last_doc = first_doc

    def add(self, doc_index: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, n_bytes: np.ndarray) -> None:
        """Append documents (their indices, tokens back to back, tokens and UTF-8 bytes per document).

        A shard is finished after the first document that brings it to shard_tokens: documents never span
        shards, and the boundaries depend only on the documents.
        """
        first, token_start = 0, 0
        while first < len(lengths):
            if self._file is None:
                self._open(int(doc_index[first]))
            total = self._tokens + np.cumsum(lengths[first:])
            end = first + min(int(np.searchsorted(total, self.shard_tokens)) + 1, len(total))  # docs [first, end)
            n_tokens = int(total[end - first - 1]) - self._tokens
            data = memoryview(np.ascontiguousarray(tokens[token_start:token_start + n_tokens], dtype=self.dtype))
            self._file.write(data.cast("B"))
            self._hash.update(data.cast("B"))
            self._lengths.append(lengths[first:end])
            self._tokens += n_tokens
            self._bytes += int(n_bytes[first:end].sum())
            self._last_doc = int(doc_index[end - 1])
            if self._tokens >= self.shard_tokens:
                self._commit()
            first, token_start = end, token_start + n_tokens

    def finish(self) -> None:
        if self._file is not None:
            self._commit()

    def abort(self) -> None:
        """Close and delete the unfinished shard (on an error): nothing partial stays behind."""
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file = None

    def _commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        lengths = np.concatenate(self._lengths)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        index_bytes = offsets.tobytes()
        write_bytes_atomically(self.out_dir / self._idx_name, index_bytes)
        os.replace(self._tmp, self.out_dir / self._bin_name)
        fsync_folder(self.out_dir)
        record = {
            "file": self._bin_name,
            "index": self._idx_name,
            "tokens": self._tokens,
            "documents": len(lengths),
            "bytes": self._bytes,
            "first_doc": self._first_doc,
            "last_doc": self._last_doc,
            "sha256": self._hash.hexdigest(),
            "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
        }
        self.next_index += 1
        self.on_commit(self.split, record)


# ----------------------------------------------------------------------------------------------------------
# reader


class ShardFile:
    """One shard, memory-mapped on first use in each process (pickles as its paths, for DataLoader workers)."""

    def __init__(self, data_dir: Path, record: dict[str, Any], dtype: np.dtype) -> None:
        self.path = Path(data_dir) / record["file"]
        self.index_path = Path(data_dir) / record["index"]
        self.n_tokens = int(record["tokens"])
        self.n_docs = int(record["documents"])
        self.dtype = np.dtype(dtype)
        self._tokens: Optional[np.ndarray] = None
        self._offsets: Optional[memoryview] = None
        self._offsets_array: Optional[np.ndarray] = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None, "_offsets": None, "_offsets_array": None}

    @property
    def name(self) -> str:
        return str(self.path)

    def check(self) -> None:
        """Sizes against the metadata and the document index structure; raises ShardError naming the file."""
        expected_sizes = ((self.path, self.n_tokens * self.dtype.itemsize), (self.index_path, (self.n_docs + 1) * 8))
        for path, expected in expected_sizes:
            if not path.is_file():
                raise ShardError(f"{path}: missing (listed in {METADATA_FILE}); re-run `llmtrain prepare`")
            size = path.stat().st_size
            if size != expected:
                raise ShardError(
                    f"{path}: {size} bytes, but {METADATA_FILE} says {expected}: the shard is truncated or "
                    "corrupted; re-run `llmtrain prepare` on this folder to rewrite it"
                )
        offsets = np.frombuffer(_map(self.index_path), dtype=np.int64)
        if offsets[0] != 0 or offsets[-1] != self.n_tokens or not bool(np.all(np.diff(offsets) > 0)):
            raise ShardError(
                f"{self.index_path}: document offsets are corrupted (not 0 .. {self.n_tokens}, increasing)")

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.frombuffer(_map(self.path), dtype=self.dtype)
        return self._tokens

    @property
    def offsets(self) -> Sequence[int]:
        """Document start offsets (n_docs + 1 values); indexing gives plain ints, fast for Python bisect."""
        if self._offsets is None:
            self._offsets = memoryview(self.offsets_array).cast("B").cast("q")
        return self._offsets

    @property
    def offsets_array(self) -> np.ndarray:
        """The same offsets as a numpy array (for vectorized reads)."""
        if self._offsets_array is None:
            self._offsets_array = np.frombuffer(_map(self.index_path), dtype=np.int64)
        return self._offsets_array


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_metadata(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check a prepared folder's metadata.json (format, version, finished)."""
    path = Path(data_dir) / METADATA_FILE
    if not path.is_file():
        raise ShardError(f"{path}: missing; {data_dir} is not a prepared folder (run `llmtrain prepare`)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: invalid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise ShardError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ShardError(f"{path}: version {meta.get('version')} is not supported (this code reads version {VERSION})")
    if not meta.get("complete"):
        raise ShardError(f"{path}: the prepare of this folder did not finish; re-run `llmtrain prepare` to resume it")
    return meta


def open_split(data_dir: str | os.PathLike[str], meta: dict[str, Any], split: str) -> list[ShardFile]:
    """The checked shards of one split (sizes, index structure)."""
    dtype = np.dtype(meta["settings"]["dtype"])
    shards = [ShardFile(Path(data_dir), record, dtype) for record in meta["splits"][split]["shards"]]
    for shard in shards:
        shard.check()
    return shards


def unigram_entropy(data_dir: str | os.PathLike[str], split: str = "val", chunk: int = 1 << 24) -> float:
    """Entropy (nats per token) of a split's token frequencies: the lowest cross-entropy on that split of any
    prediction that ignores the context, so a model scoring at or above it has learned nothing of the context."""
    meta = read_metadata(data_dir)
    counts = np.zeros(int(meta["settings"]["vocab_size"]), dtype=np.int64)
    for shard in open_split(data_dir, meta, split):
        for start in range(0, shard.n_tokens, chunk):  # bincount widens to int64: bound its memory
            counts += np.bincount(shard.tokens[start:start + chunk], minlength=len(counts))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def verify_record(data_dir: Path, record: dict[str, Any], dtype: np.dtype) -> Optional[str]:
    """Full check of one shard (sizes, index, sha256 of both files); returns the problem, or None."""
    try:
        ShardFile(data_dir, record, dtype).check()
    except ShardError as e:
        return str(e)
    if sha256_file(data_dir / record["index"]) != record["index_sha256"]:
        return f"{data_dir / record['index']}: sha256 does not match {METADATA_FILE}"
    if sha256_file(data_dir / record["file"]) != record["sha256"]:
        return f"{data_dir / record['file']}: sha256 does not match {METADATA_FILE} (corrupted)"
    return None


def verify_shards(data_dir: str | os.PathLike[str]) -> None:
    """Check every shard of a prepared folder including checksums; raises ShardError on the first problem."""
    meta = read_metadata(data_dir)
    dtype = np.dtype(meta["settings"]["dtype"])
    for split in SPLITS:
        for record in meta["splits"][split]["shards"]:
            problem = verify_record(Path(data_dir), record, dtype)
            if problem:
                raise ShardError(problem)


# ----------------------------------------------------------------------------------------------------------
# prepare

_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


Encoded = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def _encode_chunk(first: int, texts: list[str], dtype: np.dtype, val_fraction: float,
                  resume_after: dict[str, int]) -> Encoded:
    """Tokenize documents first, first + 1, ... -> per split: (document indices, all tokens back to back,
    tokens per document, UTF-8 bytes per document). Documents already in finished shards are left out."""
    assert _WORKER_TOKENIZER is not None
    index = np.arange(first, first + len(texts), dtype=np.int64)
    is_val = validation_mask(index, val_fraction)
    out: Encoded = {}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        chosen = np.flatnonzero(mask & (index > resume_after[split]))
        if len(chosen) == 0:
            continue
        docs = texts if len(chosen) == len(texts) else [texts[i] for i in chosen.tolist()]
        ids = _WORKER_TOKENIZER.encode_batch(docs)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
        n_bytes = np.fromiter((len(t.encode("utf-8")) for t in docs), dtype=np.int64, count=len(docs))
        out[split] = (index[chosen], tokens, lengths, n_bytes)
    return out


def _chunks(batches: Iterator[list[str]]) -> Iterator[tuple[int, list[str]]]:
    """(index of the first document, documents) in chunks of about CHUNK_CHARS characters."""
    chunk: list[str] = []
    first = chars = 0
    for batch in batches:
        chunk += batch
        chars += sum(map(len, batch))
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield first, chunk
            first, chunk, chars = first + len(chunk), [], 0
    if chunk:
        yield first, chunk


def _first_train_document(val_fraction: float) -> int:
    """The index of the first document that goes to the train split (document 0 is always validation)."""
    i = 0
    while is_validation_document(i, val_fraction):
        i += 1
    return i


def _empty_train_error(source: Source, documents: int, val_fraction: float) -> PrepareError:
    return PrepareError(
        f"source {source.spec!r}: the train split would be empty: {documents} document(s), and the first "
        f"{_first_train_document(val_fraction)} all go to the validation split at val_fraction={val_fraction}; "
        "give more documents (one big .txt file: --txt_sample_by paragraph or line) or a smaller val_fraction")


def _require_train_documents(source: Source, batches: Iterator[list[str]], val_fraction: float
                             ) -> Iterator[list[str]]:
    """`batches` unchanged, but first read ahead (no tokenizing) until a train document is seen, and raise
    PrepareError if the source ends before: a one-document corpus is refused before any compute is spent."""
    needed = _first_train_document(val_fraction) + 1
    if source.one_document_per_file() and len(source.files()) < needed:  # decided without reading a byte
        raise _empty_train_error(source, len(source.files()), val_fraction)
    ahead: list[list[str]] = []
    seen = 0
    for batch in batches:
        ahead.append(batch)
        seen += len(batch)
        if seen >= needed:
            break
    if seen < needed:
        raise _empty_train_error(source, seen, val_fraction)
    yield from ahead
    yield from batches


def _source_fingerprint(source: Source) -> dict[str, Any]:
    if source.is_hub:
        return {"hub": source.spec}
    files = source.files()
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


@dataclass
class PrepareReport:
    metadata: dict[str, Any]
    seconds: float
    tokenized_tokens: int  # tokens tokenized by this run (less than the total when it resumed)
    resumed_shards: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokenized_tokens / max(self.seconds, 1e-9)


def prepare(
    source: Source,
    tokenizer_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    val_fraction: float = 0.005,
    num_proc: Optional[int] = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    skip_invalid: bool = False,
) -> PrepareReport:
    """Tokenize `source` into token shards in `output` (see the module docstring); resumes an interrupted run.

    Before tokenizing: every plain-text/JSON-lines file is checked for valid UTF-8 (all bad files named, or
    left out with skip_invalid), and the source is read ahead until a train document is seen."""
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"val_fraction={val_fraction} is invalid: must be in [0, 1)")
    if shard_tokens < 1:
        raise PrepareError(f"shard_tokens={shard_tokens} is invalid: must be >= 1")
    source = check_utf8(source, skip_invalid)
    num_proc = max(1, num_proc or os.cpu_count() or 1)
    t0 = time.time()
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "source": source.spec,
        "text_field": source.text_field,
        "txt_sample_by": source.txt_sample_by,
        "source_fingerprint": _source_fingerprint(source),
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    records = _resume_records(out, settings)
    if records is None:  # already complete and verified
        meta = json.loads((out / METADATA_FILE).read_text())
        return PrepareReport(meta, time.time() - t0, 0, sum(len(meta["splits"][s]["shards"]) for s in SPLITS))
    _clean_unrecorded(out, records)
    _copy_tokenizer(tokenizer, out / TOKENIZER_DIR)
    resumed = sum(len(r) for r in records.values())

    def write_meta(complete: bool, stats: Optional[SourceStats] = None) -> dict[str, Any]:
        splits = {
            split: {
                "tokens": sum(r["tokens"] for r in recs),
                "documents": sum(r["documents"] for r in recs),
                "bytes": sum(r["bytes"] for r in recs),
                "shards": recs,
            }
            for split, recs in records.items()
        }
        meta = {"format": FORMAT, "version": VERSION, "complete": complete, "settings": settings,
                "tokenizer": TOKENIZER_DIR, "splits": splits}
        if stats is not None:
            meta["source_stats"] = stats.as_dict()
        write_bytes_atomically(out / METADATA_FILE, json_bytes(meta))
        return meta

    def on_commit(split: str, record: dict[str, Any]) -> None:
        records[split].append(record)
        write_meta(complete=False)

    write_meta(complete=False)
    resume_after = {split: (recs[-1]["last_doc"] if recs else -1) for split, recs in records.items()}
    writers = {split: ShardWriter(out, split, dtype, shard_tokens, len(records[split]), on_commit) for split in SPLITS}
    stats = SourceStats()
    tokenized = 0

    from tqdm.auto import tqdm

    # Fork the tokenizer processes before this process starts threads (`datasets`, the progress bar).
    pool = None
    if num_proc > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,))
    else:
        _init_worker(tokenizer)
    bar = tqdm(desc="prepare", unit=" docs", disable=None if progress else True, mininterval=1.0)
    try:
        pending: deque[tuple[int, Any]] = deque()

        def drain_one() -> None:
            nonlocal tokenized
            n_docs, result = pending.popleft()
            encoded: Encoded = result.get() if pool is not None else result
            for split, (doc_index, tokens, lengths, n_bytes) in encoded.items():
                writers[split].add(doc_index, tokens, lengths, n_bytes)
                tokenized += len(tokens)
            bar.update(n_docs)
            bar.set_postfix(tokens=tokenized, refresh=False)

        batches = _require_train_documents(source, source.document_batches(stats), val_fraction)
        for first, texts in _chunks(batches):
            args = (first, texts, dtype, val_fraction, resume_after)
            if pool is not None:
                pending.append((len(texts), pool.apply_async(_encode_chunk, args)))
                if len(pending) >= 2 * num_proc:  # bounded: the reader never runs ahead of the tokenizers
                    drain_one()
            else:
                pending.append((len(texts), _encode_chunk(*args)))
                drain_one()
        while pending:
            drain_one()
        for writer in writers.values():
            writer.finish()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    if not records["train"]:
        raise PrepareError(
            f"source {source.spec!r}: the train split is empty ({stats.documents} documents, all in the validation "
            f"split at val_fraction={val_fraction}); give more documents (one big .txt file: --txt_sample_by paragraph)"
        )
    meta = write_meta(complete=True, stats=stats)
    return PrepareReport(meta, time.time() - t0, tokenized, resumed)


def _resume_records(out: Path, settings: dict[str, Any]) -> Optional[dict[str, list[dict[str, Any]]]]:
    """The verified shard records of an earlier run in `out` (empty lists if none); None if it is complete."""
    records: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    path = out / METADATA_FILE
    if not path.is_file():
        return records
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s: unreadable, starting the prepare from scratch", path)
        return records
    if old.get("format") != FORMAT or old.get("version") != VERSION:
        raise PrepareError(f"{path}: not a {FORMAT} v{VERSION} folder; use an empty output folder")
    old_settings = old.get("settings", {})
    if old_settings != settings:
        diff = sorted(k for k in set(settings) | set(old_settings) if settings.get(k) != old_settings.get(k))
        raise PrepareError(
            f"{out} holds a prepare with other settings "
            f"({', '.join(f'{k}: {old_settings.get(k)!r} -> {settings.get(k)!r}' for k in diff)}); "
            "use another output folder or delete this one"
        )
    dtype = np.dtype(settings["dtype"])
    all_good = True
    for split in SPLITS:
        for record in old["splits"][split]["shards"]:
            problem = verify_record(out, record, dtype)
            if problem:
                log.warning("%s; rewriting %s shards from %s on", problem, split, record["file"])
                all_good = False
                break
            records[split].append(record)
    if old.get("complete") and all_good:
        log.info("%s: already prepared and verified", out)
        return None
    if any(records.values()):
        log.info("%s: resuming after %s", out, {s: len(r) for s, r in records.items()})
    return records


def _clean_unrecorded(out: Path, records: dict[str, list[dict[str, Any]]]) -> None:
    """Delete temp files and shard files that metadata.json does not record (left by an interrupted run)."""
    keep = {name for recs in records.values() for r in recs for name in (r["file"], r["index"])}
    for path in out.iterdir():
        if TEMP_NAME.match(path.name) or (SHARD_NAME.match(path.name) and path.name not in keep):
            path.unlink()


def _copy_tokenizer(tokenizer: Tokenizer, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if not (dest / MODEL_FILE).is_file() or sha256_file(dest / MODEL_FILE) != tokenizer.sha256:
        write_bytes_atomically(dest / MODEL_FILE, tokenizer.model_bytes)
    write_bytes_atomically(dest / META_FILE, json_bytes(tokenizer.meta))
