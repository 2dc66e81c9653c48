"""`llmtrain tokenizer ...` and `llmtrain prepare ...`: argparse front ends of tokenizer.py and shards.py.

    llmtrain tokenizer train --input SRC [--text_field text] [--vocab_size 4000] --output DIR
                             [--input_sentence_size 1000000] [--seed 1234] [--txt_sample_by document]
    llmtrain prepare --source SRC [--text_field text] --tokenizer DIR_OR_MODEL --output DIR
                     [--val_fraction 0.005] [--num_proc N] [--shard_tokens 100000000] [--txt_sample_by document]
    llmtrain verify SHARDS [--no_cache]

Source options of both: [--extensions py,md] [--missing_text skip|error] [--skip_invalid].
SRC: a .txt/.jsonl/.json/.parquet file, a folder, a quoted glob, or hub:NAME[:CONFIG][@SPLIT] (see sources.py).
All return 0 on success and 2 with a one-line error on bad input (missing files, bad settings, corrupted
shards, ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Optional

from llmtrain.data.shards import DEFAULT_SHARD_TOKENS, PrepareError, ShardError, prepare
from llmtrain.data.sources import MISSING_TEXT, TXT_SAMPLE_BY, SourceError, parse_source
from llmtrain.data.verify import verify_folder
from llmtrain.data.tokenizer import TokenizerError, train_tokenizer

if TYPE_CHECKING:
    from llmtrain.data.sources import Source

USER_ERRORS = (SourceError, TokenizerError, ShardError, PrepareError)
SRC_HELP = "file (.txt/.jsonl/.json/.parquet), folder, quoted glob, or hub:NAME[:CONFIG][@SPLIT]"


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _source_args(parser: argparse.ArgumentParser, flag: str) -> None:
    parser.add_argument(flag, required=True, help=SRC_HELP)
    parser.add_argument("--text_field", default="text", help="text column of .jsonl/.parquet/hub rows")
    parser.add_argument("--txt_sample_by", default="document", choices=TXT_SAMPLE_BY,
                        help="what a document of a .txt file is (default: the whole file)")
    parser.add_argument("--extensions", default=None,
                        help="more file suffixes read as plain text, one file = one document (e.g. py,md,rst,c)")
    parser.add_argument("--missing_text", default="skip", choices=MISSING_TEXT,
                        help="rows without the text field: skip them with a warning (default) or refuse")
    parser.add_argument("--skip_invalid", action="store_true",
                        help="leave out files that are not valid UTF-8 (counted in the log) instead of refusing")


def _parse(args: argparse.Namespace, spec: str) -> "Source":
    return parse_source(spec, args.text_field, args.txt_sample_by, args.extensions, args.missing_text)


def tokenizer_main(argv: Optional[list[str]] = None) -> int:
    """`llmtrain tokenizer train ...`: train a sentencepiece BPE tokenizer; prints held-out bytes/token."""
    parser = argparse.ArgumentParser(prog="llmtrain tokenizer", description="Train a sentencepiece BPE tokenizer.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a tokenizer on a source")
    _source_args(train, "--input")
    train.add_argument("--vocab_size", type=int, default=4000)
    train.add_argument("--output", required=True, help="folder for tokenizer.model + tokenizer.json")
    train.add_argument("--input_sentence_size", type=int, default=1_000_000,
                       help="sentencepiece samples this many ~1 KB chunks of the training documents (0: all)")
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--heldout_fraction", type=float, default=0.005,
                       help="documents held out for bytes/token (prepare's validation rule)")
    train.add_argument("--num_threads", type=int, default=8,
                       help="sentencepiece threads; part of what the model depends on, so fixed by default")
    args = parser.parse_args(argv)
    _logging()
    try:
        source = _parse(args, args.input)
        report = train_tokenizer(source, args.output, vocab_size=args.vocab_size,
                                 input_sentence_size=args.input_sentence_size, seed=args.seed,
                                 heldout_fraction=args.heldout_fraction, num_threads=args.num_threads,
                                 skip_invalid=args.skip_invalid)
    except USER_ERRORS as e:
        print(f"llmtrain tokenizer: error: {e}", file=sys.stderr)
        return 2
    tok = report.tokenizer
    print(f"tokenizer: {args.output} (vocab_size {tok.vocab_size}, sha256 {tok.sha256[:12]})")
    print(f"trained on {report.train_documents} documents ({report.train_sentences} chunks) in {report.seconds:.1f} s")
    if report.heldout_tokens:
        print(f"held-out: {report.heldout_documents} documents, {report.heldout_bytes} bytes, "
              f"{report.heldout_tokens} tokens: {report.bytes_per_token:.3f} bytes/token")
    else:
        print("held-out: none (heldout_fraction 0)")
    return 0


def prepare_main(argv: Optional[list[str]] = None) -> int:
    """`llmtrain prepare ...`: tokenize a source into token shards (resumes an interrupted run)."""
    parser = argparse.ArgumentParser(prog="llmtrain prepare", description="Tokenize a source into token shards.")
    _source_args(parser, "--source")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder or .model file")
    parser.add_argument("--output", required=True, help="folder for metadata.json, shards and a tokenizer copy")
    parser.add_argument("--val_fraction", type=float, default=0.005, help="share of documents for validation")
    parser.add_argument("--num_proc", type=int, default=None, help="tokenizer processes (default: all cores)")
    parser.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (about)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    _logging()
    try:
        source = _parse(args, args.source)
        report = prepare(source, args.tokenizer, args.output, val_fraction=args.val_fraction,
                         num_proc=args.num_proc, shard_tokens=args.shard_tokens, progress=not args.no_progress,
                         skip_invalid=args.skip_invalid)
    except USER_ERRORS as e:
        print(f"llmtrain prepare: error: {e}", file=sys.stderr)
        return 2
    meta = report.metadata
    stats = meta.get("source_stats", {})
    for split in ("train", "val"):
        s = meta["splits"][split]
        print(f"{split}: {s['tokens']} tokens, {s['documents']} documents, {s['bytes']} bytes, "
              f"{len(s['shards'])} shards ({s['bytes'] / max(1, s['tokens']):.3f} bytes/token)")
    if stats:
        print(f"source: {stats['documents']} documents from {stats['files']} files; skipped {stats['skipped_empty']} "
              f"empty or blank documents, {stats['skipped_null']} rows without text, {stats['empty_files']} empty "
              f"files, {stats.get('blank_files', 0)} blank files")
    if report.resumed_shards:
        print(f"resumed: {report.resumed_shards} shards were already done")
    procs = args.num_proc or os.cpu_count() or 1
    print(f"{args.output}: {report.tokenized_tokens} tokens tokenized in {report.seconds:.1f} s "
          f"({report.tokens_per_second:,.0f} tokens/s with {procs} processes)")
    return 0


def verify_main(argv: Optional[list[str]] = None) -> int:
    """`llmtrain verify SHARDS`: check sizes, index and sha256 of every shard; names every bad one."""
    parser = argparse.ArgumentParser(
        prog="llmtrain verify",
        description="Check every shard of a prepared folder against the sha256 that prepare recorded.")
    parser.add_argument("shards", help="a folder made by `llmtrain prepare`")
    parser.add_argument("--no_cache", action="store_true",
                        help="hash every shard even if it was verified before and is unchanged (size, mtime, inode)")
    args = parser.parse_args(argv)
    _logging()
    try:
        report = verify_folder(args.shards, use_cache=not args.no_cache, raise_on_problem=False)
    except USER_ERRORS as e:
        print(f"llmtrain verify: error: {e}", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(f"llmtrain verify: error: {problem}", file=sys.stderr)
    print(f"{args.shards}: {report.shards - len(report.problems)} of {report.shards} shards good; hashed "
          f"{report.hashed_bytes / 1e6:,.1f} MB in {report.seconds:.1f} s, {report.cached} unchanged since a "
          "verified hash (cache)")
    return 2 if report.problems else 0


COMMANDS = {"tokenizer": tokenizer_main, "prepare": prepare_main, "verify": verify_main}

if __name__ == "__main__":  # python -m llmtrain.data.commands {tokenizer|prepare|verify} ...
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m llmtrain.data.commands {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
