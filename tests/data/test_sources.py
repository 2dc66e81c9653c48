"""Sources: every local format, folders, globs, a hub-style dataset folder, and each kind of bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmtrain.data.sources import SourceError, SourceStats, is_validation_document, parse_source

from . import write_jsonl


def docs_of(spec: str, **kwargs: str) -> list[str]:
    return list(parse_source(spec, **kwargs).documents())


def test_txt_file_is_one_document_by_default(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first line\n\n  second   para\n")
    assert docs_of(str(tmp_path / "a.txt")) == ["first line\n\n  second   para\n"]
    assert docs_of(str(tmp_path / "a.txt"), txt_sample_by="line") == ["first line", "  second   para"]
    assert docs_of(str(tmp_path / "a.txt"), txt_sample_by="paragraph") == ["first line", "  second   para\n"]


def test_jsonl_parquet_folder_glob_in_sorted_order(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d" / "b.jsonl", ["b1", "b2"])
    (tmp_path / "d" / "sub").mkdir()
    pq.write_table(pa.table({"text": ["c1", "c2"], "n": [1, 2]}), tmp_path / "d" / "sub" / "c.parquet")
    (tmp_path / "d" / "a.txt").write_text("a-doc")
    (tmp_path / "d" / "README.md").write_text("ignored: not a corpus file")
    assert docs_of(str(tmp_path / "d" / "b.jsonl")) == ["b1", "b2"]
    assert docs_of(str(tmp_path / "d" / "sub" / "c.parquet")) == ["c1", "c2"]
    assert docs_of(str(tmp_path / "d")) == ["a-doc", "b1", "b2", "c1", "c2"]
    assert docs_of(str(tmp_path / "d" / "**" / "*.parquet")) == ["c1", "c2"]
    assert docs_of(str(tmp_path / "d" / "*.jsonl")) == ["b1", "b2"]


def test_text_field_and_hub_style_local_dataset(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "ds" / "train.jsonl", ["t1", "t2"], field="content")
    write_jsonl(tmp_path / "ds" / "validation.jsonl", ["v1"], field="content")
    assert docs_of(str(tmp_path / "ds" / "train.jsonl"), text_field="content") == ["t1", "t2"]
    # hub:NAME takes the same code path as a hub dataset name (datasets.load_dataset(NAME, streaming=True))
    assert docs_of(f"hub:{tmp_path / 'ds'}", text_field="content") == ["t1", "t2"]
    assert docs_of(f"hub:{tmp_path / 'ds'}@validation", text_field="content") == ["v1"]
    assert parse_source("hub:org/name:cfg@test").hub_parts() == ("org/name", "cfg", "test")
    assert parse_source("hub:org/name").hub_parts() == ("org/name", None, "train")


def test_missing_path_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or folder"):
        parse_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match=r"x.csv.*unsupported file type"):
        parse_source(str(tmp_path / "x.csv"))
    with pytest.raises(SourceError, match="holds no .txt"):
        parse_source(str(tmp_path))
    with pytest.raises(SourceError, match="glob matches no"):
        parse_source(str(tmp_path / "*.jsonl"))


def test_empty_file_is_an_error_alone_and_a_counted_skip_in_a_folder(tmp_path: Path, caplog) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "empty.txt").write_text("")
    with pytest.raises(SourceError, match=r"is blank: its 1 file\(s\) are empty or hold only whitespace"):
        docs_of(str(tmp_path / "d" / "empty.txt"))
    (tmp_path / "d" / "full.txt").write_text("text")
    stats = SourceStats()
    with caplog.at_level(logging.INFO):
        assert list(parse_source(str(tmp_path / "d")).documents(stats)) == ["text"]
    assert stats.empty_files == [str(tmp_path / "d" / "empty.txt")]
    assert "empty.txt: empty file, skipped" in caplog.text


def test_missing_text_field_names_file_and_fields(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", ["x"], field="body")
    with pytest.raises(SourceError, match=r"a.jsonl: no field 'text' \(fields: body, id\)"):
        docs_of(str(tmp_path / "a.jsonl"))


def test_invalid_utf8_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"good start\n\xff\xfe broken\n")
    with pytest.raises(SourceError, match=r"bad.txt: invalid UTF-8"):
        docs_of(str(tmp_path / "bad.txt"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(SourceError, match=r"bad.jsonl: invalid UTF-8"):
        docs_of(str(tmp_path / "bad.jsonl"))


def test_broken_json_and_non_string_values(tmp_path: Path) -> None:
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{not json\n')
    with pytest.raises(SourceError, match="broken.jsonl: cannot read rows"):
        docs_of(str(tmp_path / "broken.jsonl"))
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(SourceError, match=r"num.jsonl: row 0: field 'text' is int, not a string"):
        docs_of(str(tmp_path / "num.jsonl"))


def test_empty_and_null_documents_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n{"text": ""}\n{"text": null}\n{"other": 1}\n{"text": "b"}\n')
    stats = SourceStats()
    assert list(parse_source(str(tmp_path / "a.jsonl")).documents(stats)) == ["a", "b"]
    assert (stats.documents, stats.skipped_empty, stats.skipped_null) == (2, 1, 2)


@pytest.mark.parametrize("fraction", [0.005, 0.05, 0.1, 0.3, 0.5])
def test_validation_rule_exact_count_and_first_document(fraction: float) -> None:
    flags = [is_validation_document(i, fraction) for i in range(1000)]
    assert flags[0]
    for n in (1, 7, 100, 1000):
        assert sum(flags[:n]) == -(-n * round(fraction * 1000) // 1000)  # ceil(n * fraction), exactly
    assert not any(is_validation_document(i, 0.0) for i in range(100))
