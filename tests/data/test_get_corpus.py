"""data/get_corpus.py, offline: its clean-up, the Bible's book split, the byte budget and the manifest."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "data" / "get_corpus.py"


@pytest.fixture(scope="module")
def corpus():
    spec = importlib.util.spec_from_file_location("get_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["get_corpus"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    yield module
    del sys.modules["get_corpus"]


def test_rst_loses_heading_rules_and_spdx_and_keeps_text(corpus) -> None:
    text = ".. SPDX-License-Identifier: GPL-2.0\n\n=====\nTitle\n=====\n\nBody ``code`` here.\n----\nx ~~ y\n"
    assert corpus.clean_rst(text) == "Title\n\nBody ``code`` here.\nx ~~ y\n"


def test_pod_commands_and_formatting_codes_unwrap(corpus) -> None:
    text = "=pod\n\n=head1 NAME\n\nUse C<print> and B<C<say>>, see L<perlfunc|perlfunc/say> or C<< $a <=> $b >>.\n=cut\n"
    assert corpus.clean_pod(text) == "NAME\n\nUse print and say, see perlfunc or $a <=> $b.\n"


def test_kjv_is_one_document_per_book_in_order(corpus) -> None:
    books = [f"Book{i}" for i in range(66)]
    lines = [json.dumps({"book": b, "chapter": c, "verse": v, "text": f" {b} {c}:{v} "})
             for b in books for c in (1, 2) for v in (1, 2)]
    docs = list(corpus.kjv_books("\n".join(lines)))
    assert [d.name for d in docs[:2]] == ["01_Book0.txt", "02_Book1.txt"] and len(docs) == 66
    assert docs[0].text == "Book0 1\n\nBook0 1:1 Book0 1:2\n\nBook0 2\n\nBook0 2:1 Book0 2:2\n"
    with pytest.raises(SystemExit, match="65 books, expected 66"):
        list(corpus.kjv_books("\n".join(line for line in lines if '"Book65"' not in line)))


def test_byte_budget_drops_only_docs_in_a_fixed_order(corpus) -> None:
    Doc = corpus.Document
    docs = [Doc("shakespeare", "hamlet.txt", "a" * 100)] + [Doc("linux", f"f{i}.txt", "b" * 50) for i in range(6)]
    kept, dropped = corpus.fit_budget(docs, 260)
    assert dropped == 3 and kept[0].source == "shakespeare" and sum(len(d.text) for d in kept) == 250
    assert [d.name for d in corpus.fit_budget(list(reversed(docs)), 260)[0]] == \
           [d.name for d in reversed(kept)]  # which ones go depends on their paths, not their order
    with pytest.raises(SystemExit, match="below the literature alone"):
        corpus.fit_budget(docs, 99)


def test_manifest_is_written_last_and_marks_the_corpus_complete(corpus, tmp_path) -> None:
    docs = [corpus.Document("kjv", "01_Genesis.txt", "In the beginning\n"),
            corpus.Document("perl", "perlfunc.pod.txt", "print\n")]
    assert not corpus.is_complete(tmp_path)
    corpus.write_corpus(tmp_path, docs, {"pypi": {}})
    assert corpus.is_complete(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"kjv/01_Genesis.txt", "perl/perlfunc.pod.txt"}
    (tmp_path / "texts" / "perl" / "perlfunc.pod.txt").unlink()
    assert not corpus.is_complete(tmp_path)  # a missing document: fetched again
