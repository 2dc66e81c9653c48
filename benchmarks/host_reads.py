"""Host reads that llmtrain's training step no longer makes, put back as callbacks, so that benchmarks/throughput.py
measures what removing them gave:

- PerStepHostReads (lever hostreads): the four collectives that every step of a distributed run read on the host up
  to commit fb33749 (llmtrain.training.agreement says why each drains the GPU's queue under NCCL). On one process
  every call returns at once: the lever then changes nothing.
- LoggingStepReads (lever synclog): the two reads of every logging step before the module's values were written a
  step late (llmtrain.training.step_log.DeferredStepLog).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist


class PerStepHostReads(pl.Callback):
    """Per optimizer step, as before: Lightning's SIGTERM broadcast at the batch start; ModelCheckpoint's time-trigger
    broadcast and PreemptionCheckpoint's reduce_boolean_decision at the batch end; the barrier that
    `strategy.reduce` put before SpikeDetector's mean loss."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.world_size > 1 and dist.is_initialized():
            flag = torch.tensor([0], device=trainer.strategy.root_device)
            dist.broadcast(flag, src=0)
            flag.item()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        trainer.strategy.broadcast(True)
        trainer.strategy.reduce_boolean_decision(False, all=False)
        if trainer.world_size > 1 and dist.is_initialized():
            dist.barrier()


class LoggingStepReads(pl.Callback):
    """A logging step's two reads, as the module made them: the loss, read for the progress bar between forward and
    backward, and the step's values, written as soon as the module has queued them (here at the next batch start,
    when the host has queued nothing after them: the same wait for the whole step)."""

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if pl_module._logging_step():
            loss.detach().cpu()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        pl_module.step_log.flush(trainer)
