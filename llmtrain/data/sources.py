"""Corpus sources: local .txt/.jsonl/.parquet files (or any plain-text files, e.g. code), folders, globs or a
Hugging Face hub dataset, always streamed.

A source spec (the `SRC` of `llmtrain tokenizer train --input` and `llmtrain prepare --source`) is one of:

    path/to/file.txt | .jsonl | .json | .parquet   (also .txt.gz, .jsonl.gz, .json.gz, .jsonl.zst, ...)
    path/to/folder                                 every supported file below it, recursively
    'path/**/*.jsonl'                              a glob (quote it in the shell)
    hub:NAME[:CONFIG][@SPLIT]                      a dataset `datasets.load_dataset` can stream (split: train)

Files are read one at a time in sorted path order, each through its own `datasets` streaming builder, so the
document order is deterministic, a corpus larger than memory works, and every error names the file.

What a document is: one row of a .jsonl/.parquet file or hub dataset (its `text_field`); for .txt files it is
set by `txt_sample_by`: "document" (the whole file; the default, refused above 1 GiB), "paragraph" (blank-line
separated) or "line". `extensions` (e.g. ("py", "md")) names more suffixes read as plain text, one file = one
document whatever txt_sample_by says (a source file cut into lines is not a document); they are read by the same
`datasets` text builder.

Bad input:
- missing path, no supported file, a file that cannot be parsed, invalid UTF-8, a text field that does not
  exist, a value that is not a string -> `SourceError` naming the file (and row) and what is wrong;
- empty or whitespace-only documents ("" rows, blank files) -> skipped and counted in `SourceStats`;
- rows whose text field is missing or null -> skipped with a WARNING naming the field, the file and the count,
  or refused (`SourceError` naming the same) with missing_text="error";
- a source with no document left at all -> `SourceError` that says when every file was empty or blank.
`find_invalid_utf8` lists every plain-text file that is not valid UTF-8 (run before the compute is spent), and
`Source.without` drops such files for a user who asks to skip them.
"""

from __future__ import annotations

import codecs
import dataclasses
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
MISSING_TEXT = ("skip", "error")
# A whole-file document is held in memory; above this the user must split the file into paragraphs or lines.
MAX_TXT_DOCUMENT_BYTES = 1 << 30
ROWS_PER_BATCH = 512

# suffix (without compression suffix) -> `datasets` packaged builder
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_HINT = "; other plain-text files (code, markup) count with --extensions, e.g. --extensions py,md"


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
    blank_files: list[str] = field(default_factory=list)  # files that held only whitespace

    def as_dict(self) -> dict[str, int]:
        return {
            "files": self.files,
            "documents": self.documents,
            "skipped_empty": self.skipped_empty,
            "skipped_null": self.skipped_null,
            "empty_files": len(self.empty_files),
            "blank_files": len(self.blank_files),
        }


def _suffix(path: Path) -> str:
    """The file type suffix without a compression suffix ("data.jsonl.gz" -> ".jsonl"), lower case."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _builder_for(path: Path, extensions: tuple[str, ...] = ()) -> Optional[str]:
    suffix = _suffix(path)
    return "text" if suffix and suffix[1:] in extensions else BUILDERS.get(suffix)


def parse_extensions(value: Optional[str | list[str] | tuple[str, ...]]) -> tuple[str, ...]:
    """"py,md" / [".py", "md"] -> ("md", "py"): the extra suffixes read as plain-text documents."""
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out = sorted({item.strip().lstrip(".").lower() for item in items if item.strip().lstrip(".")})
    for ext in out:
        if f".{ext}" in COMPRESSION_SUFFIXES or not ext.replace("_", "").replace("-", "").isalnum():
            raise SourceError(f"extensions: {ext!r} is invalid: give bare suffixes such as py,md,rst,c")
    return tuple(out)


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
    extensions: tuple[str, ...] = ()  # more suffixes read as plain text, one file = one document
    missing_text: str = "skip"  # rows without the text field: "skip" (WARNING with the count) or "error"
    exclude: frozenset[str] = frozenset()  # files left out (e.g. invalid UTF-8 the user chose to skip)

    def __post_init__(self) -> None:
        if self.txt_sample_by not in TXT_SAMPLE_BY:
            raise SourceError(
                f"txt_sample_by={self.txt_sample_by!r} is invalid: choose one of {', '.join(TXT_SAMPLE_BY)}")
        if self.missing_text not in MISSING_TEXT:
            raise SourceError(
                f"missing_text={self.missing_text!r} is invalid: choose one of {', '.join(MISSING_TEXT)}")
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

    def one_document_per_file(self) -> bool:
        """Whether every file is exactly one document (or none, if blank): .txt by "document", or --extensions."""
        return not self.is_hub and all(
            _builder_for(p, self.extensions) == "text"
            and (self.txt_sample_by == "document" or _suffix(p)[1:] in self.extensions) for p in self.files())

    def without(self, files: list[Path]) -> "Source":
        """This source with `files` left out."""
        return dataclasses.replace(self, exclude=self.exclude | {str(p) for p in files})

    def _types(self) -> str:
        return "/".join([".txt", ".jsonl", ".json", ".parquet", *(f".{e}" for e in self.extensions)])

    def files(self) -> list[Path]:
        """The local files of this source, sorted; raises SourceError if there are none."""
        return [p for p in self._all_files() if str(p) not in self.exclude]

    def _all_files(self) -> list[Path]:
        if self.is_hub:
            raise SourceError(f"source {self.spec!r} is a hub dataset, it has no local files")
        spec = os.path.expanduser(self.spec)
        path = Path(spec)
        if any(c in spec for c in "*?["):
            matches = sorted(Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file())
            files = [p for p in matches if _builder_for(p, self.extensions)]
            if not files:
                raise SourceError(f"source {self.spec!r}: the glob matches no {self._types()} file{_HINT}")
            return files
        if path.is_dir():
            every = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            files = [p for p in every if _builder_for(p, self.extensions)]
            if len(every) > len(files):
                other = sorted({_suffix(p) or "(none)" for p in every if not _builder_for(p, self.extensions)})
                log.info("source %s: ignoring %d files of other types (%s)", self.spec, len(every) - len(files),
                         ", ".join(other[:10]))
            if not files:
                raise SourceError(f"source {self.spec!r}: the folder holds no {self._types()} file{_HINT}")
            return files
        if not path.exists():
            raise SourceError(f"source {self.spec!r}: no such file or folder")
        if _builder_for(path, self.extensions) is None:
            raise SourceError(
                f"source {self.spec!r}: unsupported file type {''.join(path.suffixes) or '(none)'}; "
                f"use one of {', '.join(BUILDERS)} (optionally compressed){_HINT}"
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
        if stats.skipped_empty or stats.skipped_null or stats.empty_files or stats.blank_files:
            log.info(
                "source %s: %d documents; skipped %d empty or blank documents, %d rows without text, %d empty "
                "files, %d blank files", self.spec, stats.documents, stats.skipped_empty, stats.skipped_null,
                len(stats.empty_files), len(stats.blank_files),
            )
        if self.exclude:
            log.warning("source %s: %d files left out (invalid UTF-8, skipped on request)", self.spec,
                        len(self.exclude))
        if stats.documents == 0 and stats.files and len(stats.empty_files) + len(stats.blank_files) == stats.files:
            names = (stats.empty_files + stats.blank_files)[:5]
            raise SourceError(
                f"source {self.spec!r} is blank: its {stats.files} file(s) are empty or hold only whitespace "
                f"({', '.join(names)}{', ...' if stats.files > 5 else ''}); point it at files with text")
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
        builder = _builder_for(path, self.extensions)
        kwargs: dict[str, Any] = {}
        text_field = self.text_field
        if builder == "text":
            text_field = "text"  # the text builder's only column
            # A file of a user-named type (code, markup) is one document: its lines mean nothing alone.
            sample_by = "document" if _suffix(path)[1:] in self.extensions else self.txt_sample_by
            kwargs["sample_by"] = sample_by
            if sample_by == "document" and size > MAX_TXT_DOCUMENT_BYTES:
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
        before = (stats.documents, stats.skipped_empty)
        yield from self._rows(stream, str(path), text_field, stats, self.missing_text)
        if builder == "text" and stats.documents == before[0] and stats.skipped_empty > before[1]:
            stats.blank_files.append(str(path))
            log.warning("%s: blank file (only whitespace), skipped", path)

    def _hub_documents(self, stats: SourceStats) -> Iterator[list[str]]:
        import datasets

        name, config, split = self.hub_parts()
        stats.files += 1
        try:
            stream = datasets.load_dataset(name, config, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"hub dataset {name!r} (config {config}, split {split}): {type(e).__name__}: {e}") from e
        yield from self._rows(stream, f"hub dataset {name!r}", self.text_field, stats, self.missing_text)

    @staticmethod
    def _rows(stream: Any, where: str, text_field: str, stats: SourceStats, missing_text: str = "skip"
              ) -> Iterator[list[str]]:
        # IterableDataset.iter(), not iter(IterableDataset): inside a DataLoader worker the latter reads only
        # the worker's share of the files, and the on-the-fly mode deals documents to workers itself.
        batches = stream.iter(batch_size=ROWS_PER_BATCH)
        row_index = missing = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                _report_missing(where, text_field, missing, missing_text)
                stats.skipped_null += missing
                return
            except UnicodeDecodeError as e:
                raise SourceError(f"{where}: invalid UTF-8 ({e.reason}, byte {e.object[e.start:e.start + 1]!r})") from e
            except Exception as e:  # noqa: BLE001 - parse errors of json/parquet/hub rows
                raise SourceError(f"{where}: cannot read rows from {row_index} on: {type(e).__name__}: {e}") from e
            if text_field not in batch:
                raise SourceError(
                    f"{where}: no field {text_field!r} (fields: {', '.join(sorted(batch))}); set text_field")
            texts = batch[text_field]
            # Whitespace-only documents teach nothing and would hide a blank file; isspace() stops at the
            # first visible character, so the check is cheap.
            docs = [t for t in texts if t.__class__ is str and t and not t.isspace()]
            if len(docs) < len(texts):  # the rare path: count what is skipped, refuse what is not text
                for i, text in enumerate(texts):
                    if text is None:
                        missing += 1
                    elif not isinstance(text, str):
                        raise SourceError(
                            f"{where}: row {row_index + i}: field {text_field!r} is {type(text).__name__}, "
                            "not a string")
                    elif not text or text.isspace():
                        stats.skipped_empty += 1
            stats.documents += len(docs)
            row_index += len(texts)
            if docs:
                yield docs


def _report_missing(where: str, text_field: str, missing: int, missing_text: str) -> None:
    """Rows of one file without the text field: a WARNING with the count, or an error when asked to refuse."""
    if not missing:
        return
    if missing_text == "error":
        raise SourceError(
            f"{where}: {missing} rows have no {text_field!r} value (missing or null); fix the file, or let them "
            "be skipped (--missing_text skip)")
    log.warning("%s: skipped %d rows with no %r value (missing or null); --missing_text error refuses them",
                where, missing, text_field)


def find_invalid_utf8(source: Source) -> list[tuple[Path, str]]:
    """Every uncompressed plain-text or JSON-lines file of a local source that is not valid UTF-8, with where.

    Read in blocks through an incremental decoder (about the speed of reading the files), so all bad files
    are named at once, before a tokenizer or prepare spends compute and stops at the first one.
    """
    if source.is_hub:
        return []
    bad = []
    for path in source.files():
        if _builder_for(path, source.extensions) not in ("text", "json") or path.suffix.lower() in COMPRESSION_SUFFIXES:
            continue
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    decoder.decode(block)
                    offset += len(block)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            where = offset + e.start if e.start < len(e.object) else offset
            bad.append((path, f"{e.reason} near byte {where}"))
    return bad


def check_utf8(source: Source, skip_invalid: bool = False) -> Source:
    """Refuse a source with invalid UTF-8 files (naming every one), or leave them out when skip_invalid."""
    bad = find_invalid_utf8(source)
    if not bad:
        return source
    listing = "; ".join(f"{path} ({why})" for path, why in bad[:20]) + (" ..." if len(bad) > 20 else "")
    if not skip_invalid:
        raise SourceError(
            f"source {source.spec!r}: {len(bad)} file(s) are not valid UTF-8: {listing}. Convert them to UTF-8, "
            "remove them, or leave them out with --skip_invalid")
    log.warning("source %s: leaving out %d file(s) that are not valid UTF-8: %s", source.spec, len(bad), listing)
    return source.without([path for path, _ in bad])


def parse_source(spec: str, text_field: str = "text", txt_sample_by: str = "document",
                 extensions: Optional[str | list[str] | tuple[str, ...]] = None, missing_text: str = "skip") -> Source:
    """Parse a source spec (see the module docstring); checks local paths exist now, hub names when read."""
    source = Source(spec=spec, text_field=text_field, txt_sample_by=txt_sample_by,
                    extensions=parse_extensions(extensions), missing_text=missing_text)
    if source.is_hub:
        source.hub_parts()
    else:
        source.files()
    return source
