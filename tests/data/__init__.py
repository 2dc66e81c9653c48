"""Shared helpers for the data pipeline tests: a generated corpus, a tiny tokenizer, prepared shards.

Fixtures live here (not in a conftest) and are imported by each test module with `from . import ...`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

WORDS = ("the", "king", "queen", "of", "and", "to", "a", "in", "my", "lord", "thou", "art", "sweet", "night",
         "day", "love", "death", "crown", "sword", "fair", "ñandú", "naïve", "über", "日本")


def make_documents(n_docs: int, seed: int = 0, min_lines: int = 2, max_lines: int = 30) -> list[str]:
    """Documents whose lines are all different ("doc D line L: ..."), so every window of tokens is unique."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        lines = []
        for line in range(rng.randint(min_lines, max_lines)):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
            spaces = " " * rng.randint(1, 3)
            lines.append(f"doc {d} line {line}:{spaces}{words} {rng.randint(0, 10**6)}")
        docs.append("\n".join(lines) + "\n")
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({field: doc, "id": len(doc)}, ensure_ascii=False) + "\n")
    return path


def read_split(data_dir: Path, split: str) -> list[np.ndarray]:
    """The documents of a prepared split, read straight from the files (independent of the reader code)."""
    meta = json.loads((Path(data_dir) / "metadata.json").read_text())
    docs = []
    for shard in meta["splits"][split]["shards"]:
        tokens = np.fromfile(Path(data_dir) / shard["file"], dtype=meta["settings"]["dtype"]).astype(np.int64)
        offsets = np.fromfile(Path(data_dir) / shard["index"], dtype=np.int64)
        docs += [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return docs


def pack_reference(docs: list[np.ndarray], eos: int, bos: int | None) -> np.ndarray:
    """The packed stream, built the obvious way."""
    parts = []
    for doc in docs:
        if bos is not None:
            parts.append([bos])
        parts += [doc, [eos]]
    return np.concatenate(parts).astype(np.int64)


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    return make_documents(80, seed=1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory, corpus_docs: list[str]) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus_docs)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    from llmtrain.data.sources import parse_source
    from llmtrain.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(parse_source(str(corpus)), out, vocab_size=400, num_threads=1)
    return out


@pytest.fixture(scope="session")
def shards_dir(tmp_path_factory: pytest.TempPathFactory, corpus: Path, tokenizer_dir: Path) -> Path:
    from llmtrain.data.shards import prepare
    from llmtrain.data.sources import parse_source

    out = tmp_path_factory.mktemp("shards")
    prepare(parse_source(str(corpus)), tokenizer_dir, out, val_fraction=0.05, num_proc=1, shard_tokens=6000,
            progress=False)
    return out
