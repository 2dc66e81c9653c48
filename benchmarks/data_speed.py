"""Data pipeline speed: prepare (tokens/s per core, against sentencepiece's own encode) and DataModule delivery.

    python benchmarks/data_speed.py --texts data/shakespeare/texts [--copies 4] [--num_proc 1 2] [--repeat 3]

Builds a JSON-lines corpus of the texts' paragraphs, `copies` times over (many small documents, as in web
corpora: the per-document costs show), trains a 4000-token tokenizer on the texts, then measures:
  1. sentencepiece alone: `SentencePieceProcessor.encode(list_of_documents)` on one thread, same documents;
  2. `prepare` end to end (read through `datasets`, tokenize, write shards), for each --num_proc: wall-clock
     tokens/s, and tokens per CPU-second of all its processes (the per-core cost, robust to a busy machine);
  3. TokenDataModule training batches from those shards and from shards of the whole texts (one document
     per text), for each --workers, with and without document masking, at seq_len x micro_batch 2048 x 8
     and 256 x 16.
Each number is the best of --repeat runs (shared machines are noisy). Prints markdown tables; docs/data.md
holds the results and the machine they were measured on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

from llmtrain.data.datamodule import TokenDataModule
from llmtrain.data.shards import prepare, read_metadata
from llmtrain.data.sources import parse_source
from llmtrain.data.tokenizer import load_tokenizer, train_tokenizer


def build_corpus(texts: Path, work: Path, copies: int) -> Path:
    """Paragraphs of every text as JSON lines, `copies` times."""
    paragraphs = [p + "\n\n" for f in sorted(texts.glob("*.txt")) for p in f.read_text().split("\n\n") if p.strip()]
    corpus = work / "paragraphs.jsonl"
    with open(corpus, "w") as f:
        for _ in range(copies):
            for p in paragraphs:
                f.write(json.dumps({"text": p}) + "\n")
    return corpus


def best(repeat: int, run: Callable[[], tuple]) -> tuple:
    """The run with the most items per second of `repeat` runs; a run returns (items, seconds, ...)."""
    return min((run() for _ in range(repeat)), key=lambda r: r[1] / max(r[0], 1))


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (prepare's tokenizer processes)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def sentencepiece_encode(docs: list[str], tokenizer: Path) -> tuple[int, float, float]:
    tok = load_tokenizer(tokenizer)
    t0, c0 = time.perf_counter(), cpu_seconds()
    n = sum(len(ids) for ids in tok.encode_batch(docs, num_threads=1))
    return n, time.perf_counter() - t0, cpu_seconds() - c0


def prepare_run(corpus: Path, tokenizer: Path, out: Path, num_proc: int) -> tuple[int, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    report = prepare(parse_source(str(corpus)), tokenizer, out, num_proc=num_proc, progress=False)
    return report.tokenized_tokens, time.perf_counter() - t0, cpu_seconds() - c0


def loader_run(shards: Path, seq_len: int, batch: int, workers: int, masking: bool,
               seconds: float) -> tuple[int, float]:
    dm = TokenDataModule(data_dir=str(shards), seq_len=seq_len, micro_batch_size=batch, num_workers=workers,
                         document_masking=masking, pin_memory=False)
    it = iter(dm.train_dataloader())
    for _ in itertools.islice(it, 20):  # warm-up: worker start, page cache
        pass
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["input_ids"].numel()
    dt = time.perf_counter() - t0
    del it
    return n, dt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", default="data/shakespeare/texts")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--work", default="/tmp/llmtrain-bench")
    parser.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per DataModule measurement")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(Path(args.texts), work, args.copies)
    tokenizer = work / "tokenizer"
    train_tokenizer(parse_source(args.texts), tokenizer, vocab_size=4000)
    docs = list(parse_source(str(corpus)).documents())  # also warms imports and the page cache

    n, dt, cpu = best(args.repeat, lambda: sentencepiece_encode(docs, tokenizer))
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f} MB, {n / 1e6:.2f}M tokens; "
          f"{os.cpu_count()} cores\n")
    print("| stage | tokens/s (wall) | tokens per CPU-second (all processes) |\n|---|---|---|")
    print(f"| sentencepiece encode alone, 1 thread | {n / dt / 1e6:.2f}M | {n / cpu / 1e6:.2f}M |")
    for num_proc in args.num_proc:
        n, dt, cpu = best(args.repeat, lambda: prepare_run(corpus, tokenizer, work / "shards", num_proc))
        print(f"| llmtrain prepare, num_proc={num_proc} | {n / dt / 1e6:.2f}M | {n / cpu / 1e6:.2f}M |")

    # the same text with each play as one document: few, long documents
    n_plays = prepare_run(Path(args.texts), tokenizer, work / "shards_plays", max(args.num_proc))[0]
    docs_plays = sum(s["documents"] for s in read_metadata(work / "shards_plays")["splits"].values())
    corpora = {"paragraphs": work / "shards", "plays": work / "shards_plays"}
    print(f"\nDataModule training batches from shards: 'paragraphs' = the corpus above ({n / len(docs):.0f} tokens "
          f"per document), 'plays' = {args.texts}, one document per file ({n_plays / docs_plays:.0f} tokens per "
          "document)\n")
    print("| documents | seq_len x micro_batch | num_workers | document_masking | tokens/s per rank |\n"
          "|---|---|---|---|---|")
    for name, (seq_len, batch), workers, masking in itertools.product(
            corpora, [(2048, 8), (256, 16)], args.workers, (False, True)):
        n, dt = best(args.repeat, lambda: loader_run(corpora[name], seq_len, batch, workers, masking, args.seconds))
        print(f"| {name} | {seq_len} x {batch} | {workers} | {masking} | {n / dt / 1e6:.1f}M |")


if __name__ == "__main__":
    main()
