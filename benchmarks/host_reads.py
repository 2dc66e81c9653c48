"""PerStepHostReads: the four collectives that every step of a distributed llmtrain run read on the host up to
commit fb33749, put back as one callback, so that `benchmarks/throughput.py --devices N --variants shipped hostreads`
measures what they cost (llmtrain.training.agreement says why each drains the GPU's queue under NCCL). On one
process every call below returns at once: the lever then changes nothing.
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
