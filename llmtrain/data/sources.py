"""Corpus sources: local .txt/.jsonl/.parquet files, folders, globs or a Hugging Face hub dataset, always streamed.

A source spec (the `SRC` of `llmtrain tokenizer train --input` and `llmtrain prepare --source`) is one of:

    path/to/file.txt | .jsonl | .json | .parquet   (also .txt.gz, .jsonl.gz, .json.gz, .jsonl.zst, ...)
    path/to/folder                                 every supported file below it, recursively
    'path/**/*.jsonl'                              a glob (quote it in the shell)
    hub:NAME[:CONFIG][@SPLIT]                      a dataset `datasets.load_dataset` can stream (split: train)

Files are read one at a time in sorted path order, each through its own `datasets` streaming builder, so the
document order is deterministic, a corpus larger than memory works, and every error names the file.

What a document is: one row of a .jsonl/.parquet file or hub dataset (its `text_field`); for .txt files it is
set by `txt_sample_by`: "document" (the whole file; the default, refused above 1 GiB), "paragraph" (blank-line
separated) or "line".

Bad input:
- missing path, no supported file, a file that cannot be parsed, invalid UTF-8, a text field that does not
  exist, a value that is not a string -> `SourceError` naming the file (and row) and what is wrong;
- empty documents ("" rows, empty files) and null values -> skipped and counted in `SourceStats`, logged at
  the end of each pass; a source with no document left at all -> `SourceError`.
"""

from __future__ import annotations

import functools
import glob as globlib
import logging
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

log = logging.getLogger(__name__)

HUB_PREFIX = "hub:"
TXT_SAMPLE_BY = ("document", "paragraph", "line")
# A whole-file document is held in memory; above this the user must split the file into paragraphs or lines.
MAX_TXT_DOCUMENT_BYTES = 1 << 30
ROWS_PER_BATCH = 512

# suffix (without compression suffix) -> `datasets` packaged builder
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")


class SourceError(ValueError):
    """A corpus cannot be read; the message names the file (or hub dataset) and what is wrong."""


@dataclass
class SourceStats:
    """Counts of one pass over a source, for logs and for the shard metadata."""

    files: int = 0
    documents: int = 0
    skipped_empty: int = 0
    skipped_null: int = 0
    empty_files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "files": self.files,
            "documents": self.documents,
            "skipped_empty": self.skipped_empty,
            "skipped_null": self.skipped_null,
            "empty_files": len(self.empty_files),
        }


def _builder_for(path: Path) -> Optional[str]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def is_validation_document(index: int, val_fraction: float) -> bool:
    """Whether document `index` (0-based, in source order) belongs to the validation split.

    Exactly ceil(n * val_fraction) of the first n documents are validation documents, spread evenly, and
    document 0 is always one of them (if val_fraction > 0): a small corpus still gets a validation split,
    and the rule needs no count of the documents, so it works on a stream.
    """
    return val_fraction > 0 and bool(_ceil_steps(index, val_fraction))


def validation_mask(indices: np.ndarray, val_fraction: float) -> np.ndarray:
    """`is_validation_document` for an array of document indices."""
    if val_fraction <= 0:
        return np.zeros(indices.shape, dtype=bool)
    return _ceil_steps(indices.astype(np.int64), val_fraction)


def _ceil_steps(i: Any, fraction: float) -> Any:
    """ceil(i*f) < ceil((i+1)*f) in exact integer arithmetic, for an int or an int64 array."""
    p, q = _as_ratio(fraction)
    return -((-i * p) // q) < -((-(i + 1) * p) // q)


@functools.lru_cache(maxsize=16)
def _as_ratio(fraction: float) -> tuple[int, int]:
    f = Fraction(fraction).limit_denominator(1_000_000)
    return f.numerator, f.denominator


@dataclass(frozen=True)
class Source:
    """A parsed source spec. Picklable (plain strings), so DataLoader workers can stream it themselves."""

    spec: str
    text_field: str = "text"
    txt_sample_by: str = "document"

    def __post_init__(self) -> None:
        if self.txt_sample_by not in TXT_SAMPLE_BY:
            raise SourceError(
                f"txt_sample_by={self.txt_sample_by!r} is invalid: choose one of {', '.join(TXT_SAMPLE_BY)}")
        if not self.spec:
            raise SourceError("source spec is empty: give a file, folder, glob or hub:NAME[:CONFIG][@SPLIT]")

    @property
    def is_hub(self) -> bool:
        return self.spec.startswith(HUB_PREFIX)

    def hub_parts(self) -> tuple[str, Optional[str], str]:
        """(name, config, split) of a hub:NAME[:CONFIG][@SPLIT] spec."""
        rest = self.spec[len(HUB_PREFIX):]
        rest, _, split = rest.partition("@")
        name, _, config = rest.partition(":")
        if not name:
            raise SourceError(f"source {self.spec!r}: no dataset name after 'hub:'")
        return name, (config or None), (split or "train")

    def files(self) -> list[Path]:
        """The local files of this source, sorted; raises SourceError if there are none."""
        if self.is_hub:
            raise SourceError(f"source {self.spec!r} is a hub dataset, it has no local files")
        spec = os.path.expanduser(self.spec)
        path = Path(spec)
        if any(c in spec for c in "*?["):
            matches = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
            files = [p for p in matches if _builder_for(p)]
            if not files:
                raise SourceError(f"source {self.spec!r}: the glob matches no .txt/.jsonl/.json/.parquet file")
            return files
        if path.is_dir():
            every = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            files = [p for p in every if _builder_for(p)]
            if len(every) > len(files):
                log.info("source %s: ignoring %d files of other types", self.spec, len(every) - len(files))
            if not files:
                raise SourceError(f"source {self.spec!r}: the folder holds no .txt/.jsonl/.json/.parquet file")
            return files
        if not path.exists():
            raise SourceError(f"source {self.spec!r}: no such file or folder")
        if _builder_for(path) is None:
            raise SourceError(
                f"source {self.spec!r}: unsupported file type {''.join(path.suffixes) or '(none)'}; "
                f"use one of {', '.join(BUILDERS)} (optionally compressed)"
            )
        return [path]

    def documents(self, stats: Optional[SourceStats] = None) -> Iterator[str]:
        """Yield the non-empty documents in order (a generator: nothing is read before the first next())."""
        for batch in self.document_batches(stats):
            yield from batch

    def document_batches(self, stats: Optional[SourceStats] = None) -> Iterator[list[str]]:
        """The documents in order, in lists of up to a few hundred (no per-document Python for the caller)."""
        stats = stats if stats is not None else SourceStats()
        if self.is_hub:
            yield from self._hub_documents(stats)
        else:
            for path in self.files():
                yield from self._file_documents(path, stats)
        if stats.skipped_empty or stats.skipped_null or stats.empty_files:
            log.info(
                "source %s: %d documents; skipped %d empty documents, %d null values, %d empty files",
                self.spec, stats.documents, stats.skipped_empty, stats.skipped_null, len(stats.empty_files),
            )
        if stats.documents == 0:
            raise SourceError(
                f"source {self.spec!r}: no non-empty document ({stats.files} files, {stats.skipped_empty} empty "
                f"documents, {stats.skipped_null} null values, {len(stats.empty_files)} empty files)"
            )

    # -- readers ---------------------------------------------------------------------------------------------

    def _file_documents(self, path: Path, stats: SourceStats) -> Iterator[list[str]]:
        import datasets

        stats.files += 1
        try:
            size = path.stat().st_size
        except OSError as e:
            raise SourceError(f"{path}: cannot read: {e}") from e
        if size == 0:
            stats.empty_files.append(str(path))
            log.warning("%s: empty file, skipped", path)
            return
        builder = _builder_for(path)
        kwargs: dict[str, Any] = {}
        text_field = self.text_field
        if builder == "text":
            text_field = "text"  # the text builder's only column
            kwargs["sample_by"] = self.txt_sample_by
            if self.txt_sample_by == "document" and size > MAX_TXT_DOCUMENT_BYTES:
                raise SourceError(
                    f"{path}: {size} bytes as one document would be held in memory; "
                    "use txt_sample_by='paragraph' or 'line' (--txt_sample_by) for a file this large"
                )
        # Loading a packaged builder pings the hub to count downloads of "text.py"/"json.py" (120 ms per file,
        # or a timeout offline); local files do not need it.
        counts, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS, False
        try:
            stream = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure to open is reported with the file name
            raise SourceError(f"{path}: cannot open as {builder}: {type(e).__name__}: {e}") from e
        finally:
            datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts
        yield from self._rows(stream, str(path), text_field, stats)

    def _hub_documents(self, stats: SourceStats) -> Iterator[list[str]]:
        import datasets

        name, config, split = self.hub_parts()
        stats.files += 1
        try:
            stream = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"hub dataset {name!r} (config {config}, split {split}): {type(e).__name__}: {e}") from e
        yield from self._rows(stream, f"hub dataset {name!r}", self.text_field, stats)

    @staticmethod
    def _rows(stream: Any, where: str, text_field: str, stats: SourceStats) -> Iterator[list[str]]:
        # IterableDataset.iter(), not iter(IterableDataset): inside a DataLoader worker the latter reads only
        # the worker's share of the files, and the on-the-fly mode deals documents to workers itself.
        batches = stream.iter(batch_size=ROWS_PER_BATCH)
        row_index = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                raise SourceError(f"{where}: invalid UTF-8 ({e.reason}, byte {e.object[e.start:e.start + 1]!r})") from e
            except Exception as e:  # noqa: BLE001 - parse errors of json/parquet/hub rows
                raise SourceError(f"{where}: cannot read rows from {row_index} on: {type(e).__name__}: {e}") from e
            if text_field not in batch:
                raise SourceError(
                    f"{where}: no field {text_field!r} (fields: {', '.join(sorted(batch))}); set text_field")
            texts = batch[text_field]
            docs = [t for t in texts if t.__class__ is str and t]
            if len(docs) < len(texts):  # the rare path: count what is skipped, refuse what is not text
                for i, text in enumerate(texts):
                    if text is None:
                        stats.skipped_null += 1
                    elif not isinstance(text, str):
                        raise SourceError(
                            f"{where}: row {row_index + i}: field {text_field!r} is {type(text).__name__}, "
                            "not a string")
                    elif not text:
                        stats.skipped_empty += 1
            stats.documents += len(docs)
            row_index += len(texts)
            if docs:
                yield docs


def parse_source(spec: str, text_field: str = "text", txt_sample_by: str = "document") -> Source:
    """Parse a source spec (see the module docstring); checks local paths exist now, hub names when read."""
    source = Source(spec=spec, text_field=text_field, txt_sample_by=txt_sample_by)
    if source.is_hub:
        source.hub_parts()
    else:
        source.files()
    return source
