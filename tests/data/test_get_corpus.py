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


PAGE = """<!DOCTYPE html><html class="sidebar-visible"><head><title>T</title><style>p {}</style></head><body>
<nav id="sidebar"><a href="a.html">Chapter list</a></nav><div class="navheader">Prev Next</div>
<script>var x = "<p>no</p>";</script>
<main><h1>Title<a class="headerlink" href="#t">¶</a></h1><p>First  para,
 wrapped &amp; joined &lt;here&gt;.</p><div class="sidebar">A side note stays.</div>
<pre>fn main() {
    let x = 1;
}</pre><ul><li>one</li><li>two</li></ul><div class="toc">Contents 1 2 3</div></main>
<footer>Copyright</footer></body></html>"""


def test_html_text_takes_main_without_navigation_and_keeps_pre(corpus) -> None:
    assert corpus.html_text(PAGE) == ("Title\n\nFirst para, wrapped & joined <here>.\n\nA side note stays.\n\n"
                                      "fn main() {\n    let x = 1;\n}\n\none\n\ntwo\n")


def test_html_text_falls_back_to_sphinx_body_then_to_the_body(corpus) -> None:
    sphinx = ('<body><div class="related">Up</div><div class="sphinxsidebar">Search</div>'
              '<div class="document"><div class="body"><p>Text&nbsp;here</p></div></div></body>')
    assert corpus.html_text(sphinx) == "Text here\n"  # &nbsp; too is whitespace, normalised
    docbook = '<body><div class="navheader">Prev</div><div class="chapter"><p>A</p></div><p>outside</p></body>'
    assert corpus.html_text(docbook) == "A\n"
    assert corpus.html_text("<body><p>only</p><br>body<div id='ft' class='footer'>x</div></body>") == \
        "only\n\nbody\n"


def test_gcide_entry_loses_source_tags_and_pronunciation(corpus) -> None:
    entry = ('Affect \\Af*fect"\\, v. t. [imp. & p. p. {Affected}; L. [=a]ffectus.]\n'
             '   1. To act upon. [Obs.]\n      [1913 Webster]\n\n'
             '            As might affect the earth with cold heat. --Milton.\n      [1913 Webster +PJC]\n')
    assert corpus.clean_gcide(entry) == ("Affect, v. t. [imp. & p. p. Affected; L. affectus.]\n1. To act upon. [Obs.]"
                                         "\n\nAs might affect the earth with cold heat. --Milton.\n")
    text = "header notice\n\n" + entry.replace("Affect ", "A ", 1) + "Ab \\Ab\\, n.\n   The month.\n"
    assert corpus.gcide_entries(text.replace("A \\Af", "A \\A\\ x \\Af", 1))[1] == "Ab, n.\nThe month.\n"


def test_dedup_keeps_the_first_occurrence_and_never_touches_literature(corpus) -> None:
    Doc = corpus.Document
    boiler = "Returns the value of this field, or null if this map contains no mapping."
    docs = [Doc("kjv", "01.txt", f"{boiler}\n\nshort\n"), Doc("kjv", "02.txt", f"{boiler}\n"),
            Doc("java", "a.html.txt", f"Intro.\n\n{boiler}\n\nshort\n"),
            Doc("java", "b.html.txt", f"{'  '.join(boiler.split())}\n\n"
                f"short\n\nOwn text of b, long enough to count.\n"),
            Doc("java", "c.html.txt", f"{boiler}\n")]
    kept, removed = corpus.dedup_paragraphs(docs)
    assert [d.text for d in kept] == [docs[0].text, docs[1].text, "Intro.\n\nshort\n",
                                      "short\n\nOwn text of b, long enough to count.\n"]  # c.html left empty: gone
    assert kept[0] is docs[0] and kept[1] is docs[1] and set(removed) == {"java"}
    assert removed["java"] == sum(len(d.text) for d in docs[2:]) - sum(len(d.text) for d in kept[2:])


def test_documents_come_in_a_fixed_order_and_rust_print_pages_are_skipped(corpus, tmp_path) -> None:
    for name in ("b.rst.txt", "a/z.rst.txt", "a/b.rst.txt", "c.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"{name}\n")
    found = [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*")) if p.is_file()]
    assert found == ["a/b.rst.txt", "a/z.rst.txt", "b.rst.txt", "c.txt"]  # the traversal debian_docs uses
    assert [s[1] for s in corpus.DOCS][:3] == ["python", "perl", "linux"]  # earlier sources win the dedup
    assert corpus.in_rust_books("book/ch01-00.html") and not corpus.in_rust_books("book/print.html")
    assert not corpus.in_rust_books("book/second-edition/ch01-00.html")  # a redirect page
    assert corpus.in_rust_books("std/vec/struct.Vec.html") and not corpus.in_rust_books("core/mem/fn.swap.html")
    assert not corpus.in_rust_books("src/std/lib.rs.html") and not corpus.in_rust_books("alloc/index.html")


def test_wordnet_keeps_each_gloss_once_and_leaves_out_the_header(corpus) -> None:
    entries = ["00-database-info\nThis file was converted\n",
               "absinth\n    n 1: strong green liqueur [syn: {absinth},\n         {absinthe}]\n",
               "absinthe\n    n 1: aromatic herb\n    2: strong green liqueur [syn: {absinth},\n       {absinthe}]\n",
               "zero\n    adj 1: none\n"]
    data = "".join(entries).encode()
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    spans, offset = [], 0
    for entry in entries:
        spans.append((entry.split("\n")[0], offset, len(entry.encode())))
        offset += len(entry.encode())
    b64 = lambda n: digits[n // 64] + digits[n % 64]
    index = "\n".join(f"{head}\t{b64(start)}\t{b64(size)}" for head, start, size in reversed(spans))
    assert corpus.dict_number("Bc") == 64 + 28
    assert corpus.wordnet_entries(data, index) == [
        "absinth\nn 1: strong green liqueur [syn: absinth, absinthe]\n",
        "absinthe\nn 1: aromatic herb\n", "zero\nadj 1: none\n"]
