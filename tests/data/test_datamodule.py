"""TokenDataModule: packing against a hand-built reference, rank/worker partition, order, checks at setup."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtrain.data import datamodule
from llmtrain.data.datamodule import PackedStream, TokenDataModule, WindowPermutation, document_ids_and_positions
from llmtrain.data.shards import ShardError, open_split, read_metadata
from llmtrain.data.tokenizer import train_tokenizer
from llmtrain.data.sources import parse_source

from . import corpus, corpus_docs, pack_reference, read_split, shards_dir, tokenizer_dir  # noqa: F401

T = 32  # seq_len of these tests


def take(loader: torch.utils.data.DataLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), n))


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("vectorize_docs", [0, 10**9])  # the numpy path and the segment-by-segment path
def test_packing_matches_reference(shards_dir: Path, add_bos: bool, vectorize_docs: int, monkeypatch) -> None:
    monkeypatch.setattr(datamodule, "VECTORIZE_DOCS", vectorize_docs)
    meta = read_metadata(shards_dir)
    bos = 1 if add_bos else None
    reference = pack_reference(read_split(shards_dir, "train"), eos=2, bos=bos)
    stream = PackedStream(open_split(shards_dir, meta, "train"), eos_id=2, bos_id=bos, vocab_size=400)
    assert stream.total == len(reference)
    rng = np.random.default_rng(0)
    for n in (1, 2, 200, 3000):
        starts = [0, len(reference) - n, *rng.integers(0, len(reference) - n, 100).tolist()]
        for start in starts:  # windows crossing documents and shards
            out = np.empty(n, dtype=np.int64)
            stream.read(start, out)
            np.testing.assert_array_equal(out, reference[start:start + n])


def test_batches_are_reference_windows_with_next_token_labels(shards_dir: Path) -> None:
    dm = TokenDataModule(data_dir=str(shards_dir), seq_len=T, micro_batch_size=4, num_workers=0, add_bos=True)
    dm.setup()
    reference = pack_reference(read_split(shards_dir, "train"), eos=2, bos=1)
    windows = {tuple(reference[w * T:w * T + T + 1]) for w in range((len(reference) - 1) // T)}
    for batch in take(dm.train_dataloader(), 5):
        assert batch["input_ids"].shape == batch["labels"].shape == (4, T)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
        assert batch["input_ids"].is_contiguous() and batch["labels"].is_contiguous()  # .view(-1) works
        for x, y in zip(batch["input_ids"], batch["labels"]):
            assert tuple(x.tolist()) + (y[-1].item(),) in windows
            assert torch.equal(x[1:], y[:-1])


def test_document_ids_and_positions() -> None:
    eos, bos = 2, 1
    x = np.array([[7, 8, eos, bos, 5, 6, eos, bos, 9], [eos, 4, 4, 4, 4, eos, 3, eos, 5]])
    doc_ids, pos = document_ids_and_positions(x, eos)
    np.testing.assert_array_equal(doc_ids, [[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 3]])
    np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4, 0, 1, 0]])


def test_document_masking_batches(shards_dir: Path) -> None:
    dm = TokenDataModule(data_dir=str(shards_dir), seq_len=T, micro_batch_size=8, num_workers=0,
                         document_masking=True, add_bos=True)
    for batch in take(dm.train_dataloader(), 3):
        assert set(batch) == {"input_ids", "labels", "document_ids", "position_ids"}
        for x, d, p in zip(batch["input_ids"], batch["document_ids"], batch["position_ids"]):
            for t in range(1, T):
                new_doc = x[t - 1].item() == 2
                assert d[t] == d[t - 1] + new_doc
                assert p[t] == (0 if new_doc else p[t - 1] + 1)
                assert not new_doc or x[t].item() == 1  # with add_bos every document starts with BOS
            assert d[0] == 0 and p[0] == 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_and_workers_cover_each_epoch_exactly_once(shards_dir: Path, num_workers: int) -> None:
    world, B = 2, 3
    reference = pack_reference(read_split(shards_dir, "train"), eos=2, bos=None)
    n = (len(reference) - 1) // T
    per_rank = []
    steps = -(-2 * n // (B * world))  # two epochs and a bit
    for rank in range(world):
        dm = TokenDataModule(data_dir=str(shards_dir), seq_len=T, micro_batch_size=B, num_workers=num_workers)
        dm.set_distributed(rank, world)
        per_rank.append([b["input_ids"] for b in take(dm.train_dataloader(), steps)])
    # global sample order: step s, rank r, row b  ->  s*B*W + r*B + b
    order = [tuple(row.tolist()) for s in range(steps) for r in range(world) for row in per_rank[r][s]]
    windows = sorted(tuple(reference[w * T:w * T + T]) for w in range(n))
    assert sorted(order[:n]) == windows  # epoch 0: every window once, none twice, no gap
    assert sorted(order[n:2 * n]) == windows  # epoch 1 as well
    assert order[:n] != order[n:2 * n]  # reshuffled per epoch


def test_seed_changes_order_and_permutation_is_a_bijection(shards_dir: Path) -> None:
    def first(seed: int) -> torch.Tensor:
        dm = TokenDataModule(data_dir=str(shards_dir), seq_len=T, micro_batch_size=4, num_workers=0, seed=seed)
        return take(dm.train_dataloader(), 1)[0]["input_ids"]

    assert torch.equal(first(1), first(1)) and not torch.equal(first(1), first(2))
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        for epoch in range(2):
            perm = WindowPermutation(n, seed=5, epoch=epoch)(np.arange(n))
            assert sorted(perm.tolist()) == list(range(n))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_validation_is_fixed_finite_and_split_over_ranks(shards_dir: Path, num_workers: int) -> None:
    reference = pack_reference(read_split(shards_dir, "val"), eos=2, bos=None)
    n = (len(reference) - 1) // T
    seen = []
    for rank in range(2):
        dm = TokenDataModule(data_dir=str(shards_dir), seq_len=T, micro_batch_size=4, val_micro_batch_size=5,
                             num_workers=num_workers)
        dm.set_distributed(rank, 2)
        loader = dm.val_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader) == -(-(n // 2) // 5)
        assert batches[0]["input_ids"].shape[0] == 5
        rows = [tuple(row.tolist()) for b in batches for row in b["input_ids"]]
        assert [tuple(row.tolist()) for b in loader for row in b["input_ids"]] == rows  # fixed order
        seen += rows
    assert seen == [tuple(reference[w * T:w * T + T]) for w in range(2 * (n // 2))]


def test_bytes_per_token_vocab_and_tokenizer_path(shards_dir: Path) -> None:
    dm = TokenDataModule(data_dir=str(shards_dir), seq_len=T, micro_batch_size=4)
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.vocab_size
    dm.setup()
    meta = read_metadata(shards_dir)["splits"]["val"]
    assert dm.bytes_per_token("val") == pytest.approx(meta["bytes"] / (meta["tokens"] + meta["documents"]))
    assert dm.vocab_size == 400 and Path(dm.tokenizer_path) == (shards_dir / "tokenizer").resolve()
    dm.check_vocab(400)
    with pytest.raises(ValueError, match=r"vocab_size=512.*has 400"):
        dm.check_vocab(512)


def test_too_little_data_is_an_error_not_a_hang(shards_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"too little data: the train split .* one batch needs 1000"):
        TokenDataModule(data_dir=str(shards_dir), seq_len=T, micro_batch_size=1000).setup()
    with pytest.raises(ValueError, match=r"too little data: the val split"):
        TokenDataModule(data_dir=str(shards_dir), seq_len=4096, micro_batch_size=1).setup()


def test_other_tokenizer_and_damaged_shards_are_refused(tmp_path: Path, shards_dir: Path, corpus: Path) -> None:
    other = tmp_path / "other_tok"
    train_tokenizer(parse_source(str(corpus)), other, vocab_size=300, num_threads=1)
    with pytest.raises(ShardError, match="shards were made with tokenizer sha256"):
        TokenDataModule(data_dir=str(shards_dir), tokenizer=str(other), seq_len=T).setup()
    damaged = tmp_path / "damaged"
    shutil.copytree(shards_dir, damaged)
    with open(damaged / "train_00001.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ShardError, match=r"train_00001.bin: 100 bytes, but metadata.json says \d+"):
        TokenDataModule(data_dir=str(damaged), seq_len=T).setup()
    shutil.copy(shards_dir / "train_00001.bin", damaged / "train_00001.bin")
    data = np.fromfile(damaged / "train_00000.bin", dtype=np.uint16)
    data[:] = 65000  # same size, garbage ids
    data.tofile(damaged / "train_00000.bin")
    with pytest.raises(ShardError, match=r"train_00000.bin: sha256 [0-9a-f]{64}, but metadata.json recorded"):
        TokenDataModule(data_dir=str(damaged), seq_len=T).setup()
    # the reader's own check of token ids, for a run that skipped the hash check
    dm = TokenDataModule(data_dir=str(damaged), seq_len=T, micro_batch_size=64, num_workers=0, verify_shards=False)
    with pytest.raises(ShardError, match=r"train_00000.bin: token id 65000 >= vocab size 400"):
        take(dm.train_dataloader(), 3)
    (damaged / "metadata.json").unlink()
    with pytest.raises(ShardError, match="metadata.json: missing"):
        TokenDataModule(data_dir=str(damaged), seq_len=T).setup()


def test_global_batch_size_sets_the_accumulation_for_the_world_size(shards_dir: Path) -> None:
    dm = TokenDataModule(data_dir=str(shards_dir), seq_len=T, micro_batch_size=4, global_batch_size=32)
    for world, steps in ((1, 8), (2, 4), (8, 1)):
        dm.set_distributed(0, world)
        assert dm.accumulation() == steps
    dm.set_distributed(0, 16)
    with pytest.raises(ValueError, match=r"global_batch_size=32 is not a multiple of micro_batch_size 4 x "
                                         r"world_size 16 = 64"):
        dm.accumulation()
    dm.set_distributed(0, 2)
    with pytest.raises(ValueError, match=r"needs accumulate_grad_batches=4 .* trainer.accumulate_grad_batches=2"):
        dm.accumulation(2)
    for field in ("global_batch_size", "val_micro_batch_size"):
        with pytest.raises(ValueError, match=rf"data: {field}=0 is invalid"):
            TokenDataModule(data_dir=str(shards_dir), **{field: 0})


def test_a_fit_with_global_batch_size_accumulates_to_it(shards_dir: Path, tmp_path: Path) -> None:
    """The trainer's accumulation comes from the data's global batch at setup: 3 micro-batches of 2 per step."""
    import lightning.pytorch as pl

    from llmtrain.training.module import LanguageModel
    from tests.callbacks import tiny_config

    module = LanguageModel(tiny_config(vocab_size=400, max_seq_len=T))
    dm = TokenDataModule(data_dir=str(shards_dir), seq_len=T, micro_batch_size=2, global_batch_size=6, num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert trainer.accumulate_grad_batches == 3 and trainer.global_step == 3
    assert dm.consumed_samples == 3 * 6 and module.tokens_seen == 3 * 6 * T
