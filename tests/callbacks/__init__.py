"""Helpers shared by the callback tests: a logger that keeps what it is given, tiny models and batches, a
LanguageModel that plants loss spikes, and a one-call CPU fit."""

from __future__ import annotations

import copy
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers.logger import Logger

from llmtrain.model import ModelConfig
from llmtrain.training.module import LanguageModel
from llmtrain.training.optim import OptimConfig


class CaptureLogger(Logger):
    """Keeps every log_metrics call; `scalars` gives tag -> {step: value} as events.read_scalars does."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[Optional[int], dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    @property
    def scalars(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for step, metrics in self.rows:
            for tag, value in metrics.items():
                out.setdefault(tag, {})[step] = value
        return out


def tiny_config(**overrides: Any) -> ModelConfig:
    fields = dict(vocab_size=64, max_seq_len=16, d_model=32, n_layer=2, n_head=2)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_batches(n: int, batch_size: int = 4, seq_len: int = 16, vocab: int = 64, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=g),
             "labels": torch.randint(0, vocab, (batch_size, seq_len), generator=g)} for _ in range(n)]


class SpikeModel(LanguageModel):
    """Multiplies the loss of chosen training_step calls (counted over the whole fit, so a batch seen after a
    rollback is a new call) by a factor, NaN included; records each call's global step and batch."""

    def __init__(self, config: ModelConfig, optim: OptimConfig, plant: Optional[dict[int, float]] = None,
                 **kwargs: Any) -> None:
        super().__init__(config, optim, **kwargs)
        self.plant = plant or {}
        self.calls: list[tuple[int, torch.Tensor]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        call = len(self.calls)
        self.calls.append((self.trainer.global_step, batch["input_ids"].clone()))
        loss = super().training_step(batch, batch_idx)
        return loss * self.plant.get(call, 1.0)


class ModelTape(pl.Callback):
    """A copy of the decoder at the start of every step (the weights the step's forward and probes use)."""

    def __init__(self) -> None:
        self.decoders: dict[int, torch.nn.Module] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.decoders[trainer.global_step] = copy.deepcopy(pl_module.model)


def fit(model: LanguageModel, batches: list[dict], callbacks: list[pl.Callback], max_steps: int,
        **trainer_kwargs: Any) -> tuple[pl.Trainer, CaptureLogger]:
    """A CPU fit on in-memory batches; checkpointing only through a checkpoint callback given in `callbacks`."""
    logger = CaptureLogger()
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    options = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, enable_checkpointing=checkpointing,
                   enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                   num_sanity_val_steps=0)
    options.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer, logger
