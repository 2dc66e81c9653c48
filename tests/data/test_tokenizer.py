"""Tokenizer: exact round trip, settings and metadata, the CLI's bytes/token, load-time checks."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from llmtrain.data.commands import tokenizer_main
from llmtrain.data.tokenizer import BOS_ID, EOS_ID, UNK_ID, TokenizerError, load_tokenizer, sha256_file

from . import corpus, corpus_docs, tokenizer_dir  # noqa: F401  (fixtures)

ROUND_TRIP = [
    "plain text",
    "  two  leading spaces and   three inside   ",
    "\n\nnewlines\n\n\n and\ttabs\t\t",
    "digits 1234567890 3.14159 -42 1e10",
    "unicode: ñandú über naïve 日本語 Ελληνικά emoji 🤖🎉 math ∑∫√",
    "</s><s><unk> look like specials but are text",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tokenizer_dir: Path, text: str) -> None:
    tok = load_tokenizer(tokenizer_dir)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert UNK_ID not in ids  # byte_fallback: nothing is unknown
    assert EOS_ID not in ids and BOS_ID not in ids  # specials are never produced from text


def test_digits_are_split(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    pieces = [tok.id_to_piece(i) for i in tok.encode("12345")]
    assert pieces == ["1", "2", "3", "4", "5"]


def test_metadata(tokenizer_dir: Path) -> None:
    meta = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    assert meta["vocab_size"] == 400
    assert (meta["unk_id"], meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (0, 1, 2, -1)
    assert meta["sha256"] == sha256_file(tokenizer_dir / "tokenizer.model")
    trainer = meta["trainer"]
    assert trainer["model_type"] == "bpe" and trainer["byte_fallback"] and trainer["split_digits"]
    assert trainer["normalization_rule_name"] == "identity" and not trainer["remove_extra_whitespaces"]
    assert meta["heldout"]["documents"] >= 1 and meta["heldout"]["bytes_per_token"] > 1
    tok = load_tokenizer(tokenizer_dir)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.sha256) == (400, 1, 2, meta["sha256"])
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("the king 42") == tok.encode("the king 42")


def test_cli_trains_and_prints_bytes_per_token(tmp_path: Path, corpus: Path, capsys) -> None:  # noqa: F811
    out = tmp_path / "tok"
    assert tokenizer_main(["train", "--input", str(corpus), "--vocab_size", "300", "--output", str(out),
                           "--num_threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "bytes/token" in printed and "held-out: 1 documents" in printed  # ceil(80 * 0.005) = 1
    assert load_tokenizer(out).vocab_size == 300


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert tokenizer_main(["train", "--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "t")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_vocab_check_and_replaced_model(tmp_path: Path, tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    tok.check_vocab(400)
    with pytest.raises(ValueError, match=r"vocab_size=512 .* has 400"):
        tok.check_vocab(512)
    copy = tmp_path / "tok"
    copy.mkdir()
    (copy / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    meta = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    (copy / "tokenizer.json").write_text(json.dumps({**meta, "sha256": "0" * 64}))
    with pytest.raises(TokenizerError, match="the model file was replaced"):
        load_tokenizer(copy)
    (copy / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer(copy)
    with pytest.raises(TokenizerError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)
