"""Data-path faults: each test reproduces one fault found on purpose (it fails on the code before the fix).

corrupted shards that stay inside the vocabulary; a resume that silently changes the tokens per step; configs
without a global batch; quadratic tokenizer training on a long line; an empty train split found only after
tokenizing; rows without text dropped at INFO; a blank file not called blank; code corpora refused; invalid
UTF-8 reported from inside sentencepiece, one file at a time; and a folder of .py files through the whole flow.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from llmtrain.cli import main as llmtrain_main
from llmtrain.config_files import resolved_config
from llmtrain.data.datamodule import TokenDataModule
from llmtrain.data.shards import PrepareError, ShardError, prepare, read_metadata
from llmtrain.data.sources import SourceError, parse_source
from llmtrain.data.tokenizer import LONG_LINE_CHARS, _training_chunks, train_tokenizer
from llmtrain.data.verify import CACHE_FILE, verify_folder
from tests.data import corpus, corpus_docs, shards_dir, tokenizer_dir, write_jsonl  # noqa: F401
from tests.data.test_resume import Recorder

REPO = Path(__file__).resolve().parents[2]
T, B = 16, 2


def flip_in_vocab(path: Path, position: int = 10) -> tuple[int, int]:
    """Change one token id to another id that is still inside the vocabulary (size and mtime-free checks pass)."""
    data = np.fromfile(path, dtype=np.uint16)
    old = int(data[position])
    data[position] = old ^ 1  # ids < 400 stay < 400
    data.tofile(path)
    return old, int(data[position])


def trainer(max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, **kwargs)


def fit(dm: TokenDataModule, max_steps: int, ckpt_in: Path | None = None, ckpt_out: Path | None = None,
        **kwargs) -> Recorder:
    model, t = Recorder(), trainer(max_steps, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, datamodule=dm, ckpt_path=str(ckpt_in) if ckpt_in else None)
    if ckpt_out:
        t.save_checkpoint(ckpt_out)
    return model


@pytest.fixture(autouse=True)
def quiet_lightning() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------------------
# 1. corrupted shards


def test_a_flipped_in_vocabulary_token_stops_fit_before_the_first_step(tmp_path: Path, shards_dir: Path) -> None:
    damaged = tmp_path / "shards"
    shutil.copytree(shards_dir, damaged)
    flip_in_vocab(damaged / "train_00001.bin")
    expected = next(r["sha256"] for r in read_metadata(damaged)["splits"]["train"]["shards"]
                    if r["file"] == "train_00001.bin")
    model, t = Recorder(), trainer(3)
    with pytest.raises(ShardError) as error:
        t.fit(model, datamodule=TokenDataModule(data_dir=str(damaged), seq_len=T, micro_batch_size=B, num_workers=0))
    message = str(error.value)
    assert "train_00001.bin: sha256 " in message and f"recorded {expected}" in message
    assert "llmtrain prepare" in message
    assert model.train_batches == []  # refused before any training step
    # the documented way around it, for a user who must
    assert len(fit(TokenDataModule(data_dir=str(damaged), seq_len=T, micro_batch_size=B, num_workers=0,
                                   verify_shards=False), 2).train_batches) == 2


def test_verified_shards_are_not_hashed_again_until_they_change(tmp_path: Path, shards_dir: Path) -> None:
    folder = tmp_path / "shards"
    shutil.copytree(shards_dir, folder)
    first = verify_folder(folder)
    assert first.hashed_bytes > 0 and first.problems == [] and (folder / CACHE_FILE).is_file()
    assert verify_folder(folder).hashed_bytes == 0  # all cached
    flip_in_vocab(folder / "train_00000.bin")  # rewritten in place: mtime changes
    with pytest.raises(ShardError, match="train_00000.bin: sha256"):
        verify_folder(folder)
    with pytest.raises(ShardError, match="train_00000.bin: sha256"):  # a failed hash is never cached
        verify_folder(folder)


def test_a_read_only_shard_folder_keeps_its_cache_in_the_user_cache_dir(tmp_path: Path, shards_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "shards"
    shutil.copytree(shards_dir, folder)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # Tests run as root, for whom every folder is writable: report this one read-only as a mount would.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == folder.resolve() else real_access(p, mode))
    assert verify_folder(folder).hashed_bytes > 0
    assert not (folder / CACHE_FILE).exists()
    assert len(list((tmp_path / "cache" / "llmtrain" / "verified").glob("*.json"))) == 1
    assert verify_folder(folder).hashed_bytes == 0


def test_llmtrain_verify_names_every_bad_shard(tmp_path: Path, shards_dir: Path, capsys) -> None:
    folder = tmp_path / "shards"
    shutil.copytree(shards_dir, folder)
    assert llmtrain_main(["verify", str(folder)]) == 0
    assert "shards good" in capsys.readouterr().out
    flip_in_vocab(folder / "train_00000.bin")
    flip_in_vocab(folder / "val_00000.bin", position=1)
    assert llmtrain_main(["verify", str(folder), "--no_cache"]) == 2
    err = capsys.readouterr().err
    assert "train_00000.bin: sha256" in err and "val_00000.bin: sha256" in err


# ---------------------------------------------------------------------------------------------------------
# 2. the recipe silently changes


def test_a_resume_that_changes_tokens_per_step_is_refused_unless_allowed(tmp_path: Path, shards_dir: Path) -> None:
    data = {"data_dir": str(shards_dir), "seq_len": T, "num_workers": 0}
    fit(TokenDataModule(micro_batch_size=4, **data), 2, ckpt_out=tmp_path / "k2.ckpt")  # 4 x 16 tokens per step
    with pytest.raises(ValueError) as error:  # another micro batch, no global_batch_size: 2 x 16 tokens per step
        fit(TokenDataModule(micro_batch_size=2, **data), 3, ckpt_in=tmp_path / "k2.ckpt")
    message = str(error.value)
    assert "64 tokens per optimizer step" in message and "32" in message
    assert "--data.global_batch_size 4" in message and "--data.allow_batch_change true" in message
    # the same recipe with a smaller micro batch (accumulation follows) resumes
    assert len(fit(TokenDataModule(micro_batch_size=2, global_batch_size=4, **data), 3,
                   ckpt_in=tmp_path / "k2.ckpt").train_batches) == 2  # 1 step x 2 micro-batches
    # and the user who means it can change the batch
    assert len(fit(TokenDataModule(micro_batch_size=2, allow_batch_change=True, **data), 3,
                   ckpt_in=tmp_path / "k2.ckpt").train_batches) == 1


@pytest.mark.parametrize("config, tokens", [("quickstart", 32 * 128), ("llama-124m", 524_288),
                                            ("llama-350m", 524_288), ("llama-1b", 1_048_576)])
def test_shipped_configs_fix_the_global_batch(config: str, tokens: int) -> None:
    data = resolved_config(REPO / "configs" / f"{config}.yaml")["data"]
    assert data["global_batch_size"] * data["seq_len"] == tokens
    assert data["global_batch_size"] % data["micro_batch_size"] == 0  # accumulation follows on one device


# ---------------------------------------------------------------------------------------------------------
# 3. data-path edge cases


def test_a_multi_megabyte_single_line_trains_a_tokenizer_in_seconds(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    words = np.array(["the", "king", "ñandú", "über", "日本", "lord", "x=1;", "def", "return"])
    line = " ".join(words[rng.integers(len(words), size=800_000)])  # 3.9 M characters, 4.5 MB, no newline
    (tmp_path / "long.txt").write_text(line)
    t0 = time.time()
    train_tokenizer(parse_source(str(tmp_path / "long.txt")), tmp_path / "tok", vocab_size=300, num_threads=1,
                    heldout_fraction=0)
    assert time.time() - t0 < 10  # 1.5 s measured; cutting the line quadratically took 16 s at this size
    pieces = list(_training_chunks(iter([line])))  # bounded pieces, cut at whitespace, nothing lost
    assert "".join(pieces) == line
    assert all(len(p) <= 2 * LONG_LINE_CHARS for p in pieces) and all(p.endswith(" ") for p in pieces[:-1])


def test_a_one_document_source_is_refused_before_tokenizing(tmp_path: Path, tokenizer_dir: Path) -> None:
    write_jsonl(tmp_path / "one.jsonl", ["a single long document " * 1000])
    with pytest.raises(PrepareError) as error:
        prepare(parse_source(str(tmp_path / "one.jsonl")), tokenizer_dir, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*_00000.bin"))  # nothing was tokenized or written
    assert "train split would be empty: 1 document(s)" in str(error.value)
    (tmp_path / "one.txt").write_text("one document\n" * 100)  # one file = one document: decided from the count
    with pytest.raises(PrepareError, match="train split would be empty"):
        prepare(parse_source(str(tmp_path / "one.txt")), tokenizer_dir, tmp_path / "out2", progress=False)
    assert not list((tmp_path / "out2").glob("*_00000.bin"))


def test_rows_without_text_are_a_warning_with_field_and_count_or_an_error(tmp_path: Path, caplog) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "one"}\n{"id": 1}\n{"text": null}\n{"text": "two"}\n')
    with caplog.at_level(logging.WARNING, logger="llmtrain.data.sources"):
        assert list(parse_source(str(path)).documents()) == ["one", "two"]
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning and "skipped 2 rows with no 'text' value" in warning[0].getMessage()
    with pytest.raises(SourceError, match=r"rows.jsonl: 2 rows have no 'text' value"):
        list(parse_source(str(path), missing_text="error").documents())


def test_a_blank_file_is_called_blank(tmp_path: Path, capsys) -> None:
    (tmp_path / "blank.txt").write_text("\n\n   \n\t\n")
    with pytest.raises(SourceError, match="is blank"):
        list(parse_source(str(tmp_path / "blank.txt")).documents())
    assert llmtrain_main(["tokenizer", "train", "--input", str(tmp_path / "blank.txt"), "--output",
                          str(tmp_path / "tok"), "--vocab_size", "300"]) == 2
    assert "is blank" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# 4. corpora that are not .txt/.jsonl/.parquet


def test_invalid_utf8_names_every_bad_file_before_training_or_is_skipped(tmp_path: Path, caplog, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"ok{i}.py").write_text(f"def f{i}(x):\n    return x * {i}  # fine\n" * 20)
    (src / "bad1.py").write_bytes(b"x = 1\n# caf\xe9\n")
    (src / "bad2.md").write_bytes(b"# title\n\xff\xfe text\n")
    args = ["tokenizer", "train", "--input", str(src), "--extensions", "py,md", "--vocab_size", "300",
            "--output", str(tmp_path / "tok")]
    assert llmtrain_main(args) == 2
    err = capsys.readouterr().err
    assert "2 file(s) are not valid UTF-8" in err and "bad1.py" in err and "bad2.md" in err
    assert "--skip_invalid" in err and "Traceback" not in err and "sentencepiece" not in err
    assert not (tmp_path / "tok").exists()  # nothing trained
    with caplog.at_level(logging.WARNING):
        assert llmtrain_main([*args, "--skip_invalid"]) == 0
    assert "leaving out 2 file(s) that are not valid UTF-8" in caplog.text


def test_a_folder_of_code_goes_through_tokenizer_prepare_fit_and_generate(tmp_path: Path, capsys) -> None:
    code = tmp_path / "code"
    shutil.copytree(REPO / "llmtrain" / "data", code, ignore=shutil.ignore_patterns("__pycache__"))
    with pytest.raises(SourceError, match="holds no .*--extensions"):
        parse_source(str(code))
    tok, shards, runs = tmp_path / "tok", tmp_path / "shards", tmp_path / "runs"
    assert llmtrain_main(["tokenizer", "train", "--input", str(code), "--extensions", "py", "--vocab_size", "400",
                          "--output", str(tok)]) == 0
    assert llmtrain_main(["prepare", "--source", str(code), "--extensions", "py", "--tokenizer", str(tok),
                          "--output", str(shards), "--val_fraction", "0.2", "--num_proc", "1", "--no_progress"]) == 0
    meta = read_metadata(shards)
    n_files = len(list(code.glob("*.py")))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == n_files  # file = document
    on_the_fly = TokenDataModule(source=str(code), tokenizer=str(tok), extensions=["py"], seq_len=T,
                                 micro_batch_size=B, num_workers=0, val_fraction=0.2)
    on_the_fly.setup()
    assert next(iter(on_the_fly.train_dataloader()))["input_ids"].shape == (B, T)
    fit_args = [
        "fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.max_steps", "3",
        "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1", "--trainer.callbacks", "[]",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(runs),
        "--model.config.vocab_size", "400", "--model.config.d_model", "32", "--model.config.n_layer", "1",
        "--model.config.n_head", "2", "--model.config.max_seq_len", "32", "--model.optim.total_steps", "3",
        "--model.optim.warmup_steps", "1", "--data.data_dir", str(shards), "--data.seq_len", "32",
        "--data.micro_batch_size", "4", "--data.global_batch_size", "4",
    ]
    environ, argv = dict(os.environ), sys.argv
    sys.argv = ["llmtrain", *fit_args]  # LightningCLI reads both; the command is the same
    try:
        assert llmtrain_main(fit_args) == 0
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
    (ckpt,) = runs.rglob("*.ckpt")  # Lightning's default checkpoint at the end of the fit
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    capsys.readouterr()
    assert llmtrain_main(["generate", "--ckpt", str(ckpt), "--prompt", "def ", "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")
