"""Exact resume with a real lightning.Trainer: the batches after resuming at step k (and again from the
resumed run) equal those of an uninterrupted run; for 0 and 2 workers, and for the on-the-fly mode."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from llmtrain.data.datamodule import TokenDataModule

from . import corpus, corpus_docs, shards_dir, tokenizer_dir  # noqa: F401

T, B = 16, 2


class Recorder(L.LightningModule):
    """A tiny LM that records every batch it trains and validates on."""

    def __init__(self, vocab_size: int = 400) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, 8)
        self.head = torch.nn.Linear(8, vocab_size)
        self.train_batches: list[torch.Tensor] = []
        self.val_batches: list[torch.Tensor] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.train_batches.append(torch.cat([batch["input_ids"], batch["labels"][:, -1:]], 1).clone())
        logits = self.head(self.embed(batch["input_ids"]))  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_batches.append(batch["input_ids"].clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(data: dict[str, Any], max_steps: int, ckpt_in: Path | None = None, ckpt_out: Path | None = None,
        skip: int = 0) -> tuple[Recorder, TokenDataModule]:
    dm = TokenDataModule(seq_len=T, micro_batch_size=B, **data)
    model = Recorder()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=2,
                        check_val_every_n_epoch=None, limit_val_batches=2, num_sanity_val_steps=0)
    if skip:
        dm.skip_train_samples(skip)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt_in) if ckpt_in else None)
    if ckpt_out:
        trainer.save_checkpoint(ckpt_out)
    return model, dm


def modes(shards_dir: Path, corpus: Path, tokenizer_dir: Path) -> dict[str, dict[str, Any]]:
    return {
        "shards-workers0": {"data_dir": str(shards_dir), "num_workers": 0},
        "shards-workers2": {"data_dir": str(shards_dir), "num_workers": 2},
        "on_the_fly-workers0": {"source": str(corpus), "tokenizer": str(tokenizer_dir), "num_workers": 0,
                                "val_fraction": 0.05},
        "on_the_fly-workers2": {"source": str(corpus), "tokenizer": str(tokenizer_dir), "num_workers": 2,
                                "val_fraction": 0.05},
    }


@pytest.fixture(autouse=True)
def quiet_lightning() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


@pytest.mark.parametrize("mode", ["shards-workers0", "shards-workers2", "on_the_fly-workers0", "on_the_fly-workers2"])
def test_resume_twice_equals_uninterrupted(tmp_path: Path, shards_dir: Path, corpus: Path, tokenizer_dir: Path,
                                           mode: str) -> None:
    data = modes(shards_dir, corpus, tokenizer_dir)[mode]
    full, full_dm = fit(data, max_steps=9)
    assert len(full.train_batches) == 9
    assert full_dm.state_dict()["consumed_samples"] == 9 * B

    first, _ = fit(data, max_steps=3, ckpt_out=tmp_path / "k3.ckpt")
    ckpt = torch.load(tmp_path / "k3.ckpt", weights_only=False)
    assert ckpt["TokenDataModule"]["consumed_samples"] == 3 * B  # what was consumed, not what workers prefetched
    second, _ = fit(data, max_steps=6, ckpt_in=tmp_path / "k3.ckpt", ckpt_out=tmp_path / "k6.ckpt")
    third, third_dm = fit(data, max_steps=9, ckpt_in=tmp_path / "k6.ckpt")  # resumed from a resumed run

    resumed = first.train_batches + second.train_batches + third.train_batches
    assert len(resumed) == 9
    for step, (a, b) in enumerate(zip(full.train_batches, resumed)):
        assert torch.equal(a, b), f"{mode}: batch of step {step} differs after resume"
    assert third_dm.state_dict()["consumed_samples"] == 9 * B
    # validation runs between steps without moving the training stream, and always sees the same batches
    assert all(torch.equal(a, b) for a, b in zip(full.val_batches, first.val_batches + second.val_batches))


class SkipAfterRestore(L.Callback):
    """What a loss-spike rollback does after restoring a checkpoint: skip a window of data.

    on_fit_start runs after the checkpoint is restored and before Lightning creates the train iterator.
    """

    def __init__(self, samples: int) -> None:
        self.samples = samples

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.datamodule.skip_train_samples(self.samples)


def test_skip_train_samples_skips_exactly(tmp_path: Path, shards_dir: Path, corpus: Path, tokenizer_dir: Path) -> None:
    data = modes(shards_dir, corpus, tokenizer_dir)["shards-workers2"]
    full, _ = fit(data, max_steps=8)
    # before a fresh fit: start at global batch 2
    fresh, _ = fit(data, max_steps=3, skip=2 * B)
    assert all(torch.equal(a, b) for a, b in zip(fresh.train_batches, full.train_batches[2:5]))
    # after restoring step 2, skip the data of steps 2..4: steps 2, 3, 4 train on the batches of 5, 6, 7
    fit(data, max_steps=2, ckpt_out=tmp_path / "k2.ckpt")
    dm = TokenDataModule(seq_len=T, micro_batch_size=B, **data)
    model = Recorder()
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[SkipAfterRestore(3 * B)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm, ckpt_path=str(tmp_path / "k2.ckpt"))
    assert len(model.train_batches) == 3
    assert all(torch.equal(a, b) for a, b in zip(model.train_batches, full.train_batches[5:8]))
    assert dm.state_dict()["consumed_samples"] == 8 * B


def test_on_the_fly_with_too_few_documents_for_the_streams_is_an_error(tmp_path: Path, tokenizer_dir: Path) -> None:
    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"{i}.txt").write_text(f"document {i} " * 50)
    dm = TokenDataModule(source=str(tmp_path / "d"), tokenizer=str(tokenizer_dir), seq_len=T, micro_batch_size=B,
                         num_workers=0, val_fraction=0.3)
    dm.set_distributed(1, 2)  # 2 training documents, 2 streams: fine
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (B, T)
    dm = TokenDataModule(source=str(tmp_path / "d"), tokenizer=str(tokenizer_dir), seq_len=T, micro_batch_size=B,
                         num_workers=2, val_fraction=0.3)
    dm.set_distributed(1, 2)  # 4 streams for 2 documents
    with pytest.raises(ValueError, match="too little data"):
        next(iter(dm.train_dataloader()))
