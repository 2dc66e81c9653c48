"""Train and load sentencepiece BPE tokenizers.

A tokenizer folder holds `tokenizer.model` (the sentencepiece model) and `tokenizer.json` (metadata: vocab
size, special ids, sha256 of the model file, the training settings and the held-out bytes/token).

Settings are those of modern LLM tokenizers (Llama, Gemma): BPE; `byte_fallback` so no text is ever <unk>;
`split_digits` (numbers tokenized digit by digit, which helps arithmetic, PaLM §2); identity normalization,
whitespace kept and no dummy prefix, so decode(encode(text)) == text for every string. Special ids are fixed:
unk 0, bos 1, eos 2, and no pad id (pad_id -1): sequences are packed, never padded.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import sentencepiece as spm

from llmtrain.data.sources import Source, SourceError, check_utf8, is_validation_document
from llmtrain.files import write_bytes_atomically

log = logging.getLogger(__name__)

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
META_FORMAT = "llmtrain-sentencepiece"
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, -1
# Training "sentences" are chunks of whole lines (newlines kept, so pieces such as ".\n\n" are learned).
CHUNK_CHARS = 1024
MAX_SENTENCE_BYTES = 8192
LONG_LINE_CHARS = MAX_SENTENCE_BYTES // 8  # longer lines are cut at whitespace (<= 4 bytes per character)
HELDOUT_MAX_BYTES = 4 << 20

TRAINER_SETTINGS: dict[str, Any] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
    "split_by_whitespace": True,
    "character_coverage": 0.9995,
    "max_sentence_length": MAX_SENTENCE_BYTES,
    "shuffle_input_sentence": True,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_id": PAD_ID,
}


class TokenizerError(ValueError):
    """A tokenizer cannot be trained or loaded; the message names the file and what is wrong."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


class Tokenizer:
    """A loaded sentencepiece model with its metadata. Picklable (ships the model bytes), for worker processes."""

    def __init__(self, model_bytes: bytes, meta: dict[str, Any], path: str) -> None:
        self.path = path
        self.meta = meta
        self._model_bytes = model_bytes
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.sha256: str = meta["sha256"]
        self.vocab_size: int = int(meta["vocab_size"])
        self.unk_id: int = int(meta["unk_id"])
        self.bos_id: int = int(meta["bos_id"])
        self.eos_id: int = int(meta["eos_id"])
        self.pad_id: int = int(meta["pad_id"])

    def __getstate__(self) -> dict[str, Any]:
        return {"model_bytes": self._model_bytes, "meta": self.meta, "path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_bytes"], state["meta"], state["path"])  # type: ignore[misc]

    @property
    def model_bytes(self) -> bytes:
        return self._model_bytes

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def check_vocab(self, model_vocab_size: int) -> None:
        """Raise ValueError if the model's vocab size differs from this tokenizer's."""
        if int(model_vocab_size) != self.vocab_size:
            raise ValueError(
                f"vocab size mismatch: the model has vocab_size={model_vocab_size} but the tokenizer {self.path} "
                f"has {self.vocab_size} tokens; set the model's vocab_size to {self.vocab_size}"
            )

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer folder (tokenizer.model + tokenizer.json) or a bare sentencepiece .model file."""
    path = Path(path)
    if path.is_dir():
        model_path, meta_path = path / MODEL_FILE, path / META_FILE
    else:
        model_path, meta_path = path, path.parent / META_FILE
    if not model_path.is_file():
        raise TokenizerError(
            f"tokenizer {path}: no {model_path.name} there (train one with `llmtrain tokenizer train`)")
    model_bytes = model_path.read_bytes()
    digest = hashlib.sha256(model_bytes).hexdigest()
    try:
        sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    except Exception as e:  # noqa: BLE001
        raise TokenizerError(f"{model_path}: not a sentencepiece model: {e}") from e
    meta: dict[str, Any]
    if meta_path.is_file() and model_path.name == MODEL_FILE:
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{meta_path}: invalid JSON: {e}") from e
        if meta.get("sha256") != digest:
            raise TokenizerError(
                f"{meta_path} describes a model with sha256 {str(meta.get('sha256'))[:12]}, but {model_path} has "
                f"sha256 {digest[:12]}: the model file was replaced; retrain or restore it"
            )
        if int(meta.get("vocab_size", -1)) != sp.vocab_size():
            raise TokenizerError(f"{meta_path}: vocab_size {meta.get('vocab_size')} != the model's {sp.vocab_size()}")
    else:
        meta = {"format": META_FORMAT, "version": 1, "sha256": digest, "vocab_size": sp.vocab_size(),
                "unk_id": sp.unk_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id()}
    if meta["eos_id"] < 0:
        raise TokenizerError(f"{model_path}: the model has no eos id; documents could not be separated when packing")
    return Tokenizer(model_bytes, meta, str(path))


def split_long_line(line: str, limit: int = LONG_LINE_CHARS) -> Iterator[str]:
    """Pieces of at most `limit` characters, cut after the last whitespace of each piece where there is one.

    One pass over the line (each character is looked at a bounded number of times): re-encoding or copying
    the rest of the line for every piece would be quadratic in its length (a 50 MB single-line document then
    takes hours). `limit` characters are at most 4 * limit UTF-8 bytes, under
    sentencepiece's max_sentence_length, so no piece is dropped by it.
    """
    start, n = 0, len(line)
    while n - start > limit:
        end = start + limit
        cut = max(line.rfind(" ", start + limit // 2, end), line.rfind("\n", start + limit // 2, end),
                  line.rfind("\t", start + limit // 2, end))
        end = cut + 1 if cut >= 0 else end  # keep the space with the piece before it, as the text had it
        yield line[start:end]
        start = end
    if start < n:
        yield line[start:]


def _training_chunks(texts: Iterator[str]) -> Iterator[str]:
    """Cut documents into sentencepiece "sentences": runs of whole lines of about CHUNK_CHARS characters; a line
    longer than LONG_LINE_CHARS is cut at whitespace into pieces (split_long_line)."""
    for text in texts:
        buf: list[str] = []
        n = 0
        for whole in text.splitlines(keepends=True):
            pieces = split_long_line(whole) if len(whole) > LONG_LINE_CHARS else (whole,)
            for line in pieces:
                if buf and n + len(line) > CHUNK_CHARS:
                    yield "".join(buf)
                    buf, n = [], 0
                buf.append(line)
                n += len(line)
        if buf:
            yield "".join(buf)


@dataclass
class TrainReport:
    tokenizer: Tokenizer
    train_documents: int
    train_sentences: int
    heldout_documents: int
    heldout_bytes: int
    heldout_tokens: int
    seconds: float

    @property
    def bytes_per_token(self) -> float:
        return self.heldout_bytes / max(1, self.heldout_tokens)


def train_tokenizer(
    source: Source,
    output: str | os.PathLike[str],
    vocab_size: int = 4000,
    input_sentence_size: int = 1_000_000,
    seed: int = 1234,
    heldout_fraction: float = 0.005,
    num_threads: int = 8,
    skip_invalid: bool = False,
) -> TrainReport:
    """Train a BPE model on `source` and save it with metadata into the folder `output`.

    Documents picked by `is_validation_document(i, heldout_fraction)` (the same rule, with the same default,
    as `llmtrain prepare`'s validation split) are held out and give the bytes/token reported. sentencepiece
    keeps a uniform sample of `input_sentence_size` chunks (~1 KB each) of the rest (reservoir sampling).
    The model depends on the seed, the input and num_threads (sentencepiece 0.2 gives another model with
    another thread count, measured), so num_threads is a fixed setting, not the machine's core count: the
    same command gives the same model everywhere.

    Every plain-text/JSON-lines file is checked for valid UTF-8 first: all bad files are named in one error
    (or left out, with skip_invalid) before sentencepiece starts.
    """
    if vocab_size < 260:
        raise TokenizerError(
            f"vocab_size={vocab_size} is invalid: byte_fallback needs 256 byte pieces + 3 specials + merges")
    t0 = time.time()
    source = check_utf8(source, skip_invalid)
    heldout: list[str] = []
    counts = {"train": 0, "sentences": 0, "heldout_bytes": 0}
    source_errors: list[SourceError] = []

    def documents() -> Iterator[str]:
        # sentencepiece turns an exception of this iterator into a RuntimeError holding a traceback fragment;
        # keep ours, to raise it as it was.
        try:
            yield from source.documents()
        except SourceError as e:
            source_errors.append(e)
            raise

    def training_texts() -> Iterator[str]:
        for i, text in enumerate(documents()):
            if is_validation_document(i, heldout_fraction):
                if counts["heldout_bytes"] < HELDOUT_MAX_BYTES:
                    heldout.append(text)
                    counts["heldout_bytes"] += len(text.encode())
                continue
            counts["train"] += 1
            yield text

    def sentences() -> Iterator[str]:
        for chunk in _training_chunks(training_texts()):
            counts["sentences"] += 1
            yield chunk

    settings = dict(TRAINER_SETTINGS, vocab_size=vocab_size, input_sentence_size=input_sentence_size,
                    num_threads=num_threads)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=model, minloglevel=2, **settings)
    except RuntimeError as e:
        if source_errors:
            raise source_errors[0] from None
        if counts["train"] == 0:
            raise TokenizerError(
                f"source {source.spec!r}: no training documents left after holding out "
                f"{len(heldout)} (every document i with is_validation_document(i, {heldout_fraction})); "
                "give more documents (for one big .txt file: --txt_sample_by paragraph)"
            ) from e
        raise TokenizerError(
            f"sentencepiece training on {source.spec!r} with vocab_size={vocab_size} failed: {e}") from e
    model_bytes = model.getvalue()
    digest = hashlib.sha256(model_bytes).hexdigest()
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    heldout_tokens = sum(len(ids) for ids in sp.encode(heldout))
    heldout_bytes = sum(len(t.encode()) for t in heldout)
    meta = {
        "format": META_FORMAT,
        "version": 1,
        "model_file": MODEL_FILE,
        "sha256": digest,
        "vocab_size": sp.vocab_size(),
        "unk_id": sp.unk_id(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "pad_id": sp.pad_id(),
        "trainer": settings,
        "seed": seed,
        "source": {"spec": source.spec, "text_field": source.text_field, "txt_sample_by": source.txt_sample_by},
        "train_documents": counts["train"],
        "train_sentences": counts["sentences"],
        "heldout": {"fraction": heldout_fraction, "documents": len(heldout), "bytes": heldout_bytes,
                    "tokens": heldout_tokens, "bytes_per_token": heldout_bytes / max(1, heldout_tokens)},
    }
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(out / MODEL_FILE, model_bytes)
    write_bytes_atomically(out / META_FILE, json_bytes(meta))
    return TrainReport(
        tokenizer=load_tokenizer(out),
        train_documents=counts["train"],
        train_sentences=counts["sentences"],
        heldout_documents=len(heldout),
        heldout_bytes=heldout_bytes,
        heldout_tokens=heldout_tokens,
        seconds=time.time() - t0,
    )
