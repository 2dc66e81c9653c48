"""Periodic checkpoints: every N steps and every T minutes, `last` plus the k newest, and always the final step."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from llmtrain.checkpointing.save import AtomicCheckpointIO
from llmtrain.compat import save_checkpoint_now
from llmtrain.training.agreement import StepAgreement


class PeriodicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves on either trigger (Lightning allows only one), keeps the `keep` newest, and saves
    the step a fit ends at, so that generate/export use the model whose validation loss was reported. The time
    trigger fires when `every_minutes` have passed on rank 0's clock since the last checkpoint of any kind.

    `last.ckpt` is a link to the newest save, so `llmtrain fit --ckpt_path last` resumes from it. Saves are atomic:
    single files through AtomicCheckpointIO (installed at setup: temp file beside the target, fsync, rename), ZeRO
    folders through ZeroStrategy's staging folder. The older checkpoints are rotated away only after a new one is
    whole, and a save of non-finite weights is refused before anything is written (LanguageModel.on_save_checkpoint).
    """

    def __init__(self, dirpath: Optional[str] = None, every_n_steps: Optional[int] = 1000,
                 every_minutes: Optional[float] = None, keep: int = 3) -> None:
        if every_n_steps is None and every_minutes is None:
            raise ValueError("PeriodicCheckpoint: set every_n_steps, every_minutes or both")
        if (every_n_steps is not None and every_n_steps < 1) or (every_minutes is not None and every_minutes <= 0):
            raise ValueError(f"PeriodicCheckpoint: every_n_steps={every_n_steps} must be >= 1 and "
                             f"every_minutes={every_minutes} > 0")
        if keep < 1:
            raise ValueError(f"PeriodicCheckpoint: keep={keep} must be >= 1")
        super().__init__(dirpath=dirpath, filename="step{step:07d}", auto_insert_metric_name=False,
                         monitor="step", mode="max", save_top_k=keep, save_last="link",
                         every_n_train_steps=every_n_steps or 0, save_on_train_epoch_end=False,
                         # A resumed run must move `last` forward, not write last-v1 beside a stale last.
                         enable_version_counter=False)
        # The time trigger is this class's, not ModelCheckpoint's train_time_interval: that one broadcasts rank 0's
        # decision at every step and reads it on the host, which drains the GPU's queue (StepAgreement).
        self.every_minutes = every_minutes
        self._agreement = StepAgreement()
        self._since_save = 0.0  # rank 0's clock: the last save, or the start of training
        self._step_submitted = -1

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint, with the time trigger in it as when ModelCheckpoint held
        it: a checkpoint written before keeps its rotation state (the `keep` newest, `last`) on resume."""
        return self._generate_state_key(
            monitor=self.monitor, mode=self.mode, every_n_train_steps=self._every_n_train_steps,
            every_n_epochs=self._every_n_epochs,
            train_time_interval=timedelta(minutes=self.every_minutes) if self.every_minutes else None)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        self._agreement.reset()
        self._since_save, self._step_submitted = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # the step trigger
        if self.every_minutes is None or trainer.global_step == self._step_submitted:
            return  # no time trigger, or inside gradient accumulation (the optimizer step has not advanced)
        self._step_submitted = trainer.global_step
        # Rank 0's clock decides; across processes every rank saves one step after it said so.
        due = trainer.is_global_zero and time.monotonic() - self._since_save >= 60 * self.every_minutes
        if due:
            self._since_save = time.monotonic()  # one save per interval, whichever step the agreement lands on
        if self._agreement.submit(trainer, due):
            save_checkpoint_now(self, trainer)

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        self._since_save = time.monotonic()  # any checkpoint (step trigger, preemption) restarts the interval

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Lightning's default writer stages files in $TMPDIR (see AtomicCheckpointIO); a user's own IO is kept.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        save_checkpoint_now(self, trainer)  # no second write when the final step was just saved
        super().on_train_end(trainer, pl_module)
