"""prepare: deterministic bytes, split by document, crash-safe and resumable, corruption and mismatches refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from llmtrain.data import shards as shards_mod
from llmtrain.data.commands import prepare_main
from llmtrain.data.shards import PrepareError, ShardError, prepare, read_metadata, unigram_entropy, verify_shards
from llmtrain.data.sources import is_validation_document, parse_source
from llmtrain.data.tokenizer import load_tokenizer, train_tokenizer

from . import corpus, corpus_docs, read_split, shards_dir, tokenizer_dir, write_jsonl  # noqa: F401

SETTINGS = dict(val_fraction=0.05, shard_tokens=6000, progress=False)  # those of the shards_dir fixture


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_across_runs_and_process_counts(tmp_path: Path, corpus: Path, tokenizer_dir: Path,
                                                      shards_dir: Path, capsys) -> None:
    out = tmp_path / "again"
    assert prepare_main(["--source", str(corpus), "--tokenizer", str(tokenizer_dir), "--output", str(out),
                         "--val_fraction", "0.05", "--shard_tokens", "6000", "--num_proc", "2", "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "tokens/s" in printed
    reference = files_of(shards_dir)
    assert files_of(out) == reference  # num_proc 1 (fixture) and 2 (here): the same bytes, metadata included
    assert len([name for name in reference if name.endswith(".bin")]) >= 3  # the test covers several shards


def test_split_by_whole_documents(shards_dir: Path, tokenizer_dir: Path, corpus_docs: list[str]) -> None:
    tok = load_tokenizer(tokenizer_dir)
    val = [d for i, d in enumerate(corpus_docs) if is_validation_document(i, 0.05)]
    train = [d for i, d in enumerate(corpus_docs) if not is_validation_document(i, 0.05)]
    assert [tok.decode(d.tolist()) for d in read_split(shards_dir, "val")] == val
    assert [tok.decode(d.tolist()) for d in read_split(shards_dir, "train")] == train
    meta = read_metadata(shards_dir)
    assert meta["splits"]["val"]["documents"] == len(val) == 4
    assert meta["splits"]["train"]["bytes"] == sum(len(d.encode()) for d in train)
    assert meta["settings"]["tokenizer_sha256"] == tok.sha256 and meta["settings"]["dtype"] == "uint16"
    verify_shards(shards_dir)


def test_interrupted_prepare_leaves_nothing_partial_and_resumes(tmp_path: Path, corpus: Path, tokenizer_dir: Path,
                                                                 shards_dir: Path, monkeypatch) -> None:
    commits = []
    original = shards_mod.ShardWriter._commit

    def failing_commit(self: shards_mod.ShardWriter) -> None:
        commits.append(self.next_index)
        if len(commits) == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C while the third shard is being finished
        original(self)

    monkeypatch.setattr(shards_mod.ShardWriter, "_commit", failing_commit)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(parse_source(str(corpus)), tokenizer_dir, out, num_proc=1, **SETTINGS)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["complete"] is False and len(meta["splits"]["train"]["shards"]) == 2
    with pytest.raises(ShardError, match="did not finish"):
        read_metadata(out)
    recorded = {r[k] for s in meta["splits"].values() for r in s["shards"] for k in ("file", "index")}
    assert {p.name for p in out.iterdir() if p.suffix in (".bin", ".idx")} == recorded

    monkeypatch.setattr(shards_mod.ShardWriter, "_commit", original)
    report = prepare(parse_source(str(corpus)), tokenizer_dir, out, num_proc=2, **SETTINGS)
    assert report.resumed_shards == 2
    assert files_of(out) == files_of(shards_dir)


KILL_SCRIPT = """
import os, signal, sys
from llmtrain.data import shards
from llmtrain.data.sources import parse_source
point, count = sys.argv[4], [0]
original = shards.ShardWriter._commit
def commit(self):
    count[0] += 1
    if count[0] == 3:
        if point == "before_rename":
            os.kill(os.getpid(), signal.SIGKILL)  # the tmp file is written, nothing renamed
        self.on_commit = lambda split, record: os.kill(os.getpid(), signal.SIGKILL)  # renamed, not recorded
    original(self)
shards.ShardWriter._commit = commit
shards.prepare(parse_source(sys.argv[1]), sys.argv[2], sys.argv[3], val_fraction=0.05, shard_tokens=6000,
               num_proc=1, progress=False)
"""


@pytest.mark.parametrize("point", ["before_rename", "after_rename"])
def test_killed_prepare_resumes_to_the_same_bytes(tmp_path: Path, corpus: Path, tokenizer_dir: Path,
                                                  shards_dir: Path, point: str) -> None:
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(corpus), str(tokenizer_dir),
                          str(out), point], capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert not meta["complete"] and len(meta["splits"]["train"]["shards"]) == 2
    for record in meta["splits"]["train"]["shards"]:  # what is recorded is whole
        assert shards_mod.verify_record(out, record, np.dtype("uint16")) is None
    prepare(parse_source(str(corpus)), tokenizer_dir, out, num_proc=1, **SETTINGS)
    assert files_of(out) == files_of(shards_dir)


def test_corrupted_shard_is_detected_and_rewritten(tmp_path: Path, corpus: Path, tokenizer_dir: Path,
                                                   shards_dir: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(shards_dir, out)
    data = bytearray((out / "train_00001.bin").read_bytes())
    data[100] ^= 0xFF
    (out / "train_00001.bin").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train_00001.bin: sha256 does not match"):
        verify_shards(out)
    report = prepare(parse_source(str(corpus)), tokenizer_dir, out, num_proc=1, **SETTINGS)
    assert report.resumed_shards >= 1  # train_00000 and the val shard kept, train_00001 on rewritten
    assert files_of(out) == files_of(shards_dir)


def test_other_settings_or_tokenizer_are_refused(tmp_path: Path, corpus: Path, tokenizer_dir: Path,
                                                 shards_dir: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(shards_dir, out)
    with pytest.raises(PrepareError, match=r"other settings \(val_fraction: 0.05 -> 0.1\)"):
        prepare(parse_source(str(corpus)), tokenizer_dir, out, val_fraction=0.1, shard_tokens=6000, progress=False)
    other = tmp_path / "other_tok"
    train_tokenizer(parse_source(str(corpus)), other, vocab_size=300, num_threads=1)
    with pytest.raises(PrepareError, match="tokenizer_sha256"):
        prepare(parse_source(str(corpus)), other, out, num_proc=1, **SETTINGS)
    # a finished folder with the same settings: verified, nothing rewritten
    before = files_of(out)
    assert prepare(parse_source(str(corpus)), tokenizer_dir, out, num_proc=1, **SETTINGS).tokenized_tokens == 0
    assert files_of(out) == before


def test_a_single_document_leaves_no_train_split(tmp_path: Path, tokenizer_dir: Path) -> None:
    (tmp_path / "one.txt").write_text("only one document here\n" * 20)
    with pytest.raises(PrepareError, match="train split would be empty.*txt_sample_by paragraph"):
        prepare(parse_source(str(tmp_path / "one.txt")), tokenizer_dir, tmp_path / "out", progress=False)
    out = tmp_path / "lines"
    prepare(parse_source(str(tmp_path / "one.txt"), txt_sample_by="line"), tokenizer_dir, out, progress=False)
    assert read_metadata(out)["splits"]["train"]["documents"] == 19


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, tokenizer_dir: Path, capsys) -> None:
    write_jsonl(tmp_path / "a.jsonl", ["x"], field="body")
    assert prepare_main(["--source", str(tmp_path / "a.jsonl"), "--tokenizer", str(tokenizer_dir),
                         "--output", str(tmp_path / "out"), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "a.jsonl: no field 'text'" in err
    assert not [p for p in (tmp_path / "out").iterdir() if p.suffix in (".bin", ".idx", ".tmp")]


def test_unigram_entropy_is_the_entropy_of_the_splits_token_counts(shards_dir: Path) -> None:
    from collections import Counter
    from math import log

    for split in ("val", "train"):
        counts = Counter(int(t) for doc in read_split(shards_dir, split) for t in doc)
        total = sum(counts.values())
        expected = -sum(c / total * log(c / total) for c in counts.values())
        assert unigram_entropy(shards_dir, split) == pytest.approx(expected, rel=1e-9)
        assert unigram_entropy(shards_dir, split, chunk=7) == pytest.approx(expected, rel=1e-9)  # across chunks
    assert len(read_metadata(shards_dir)["splits"]["train"]["shards"]) > 1  # and across shards

