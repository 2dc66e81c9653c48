"""A step's scalars to the loggers: the module's per-step train/* values and the stability callbacks', each step's
in one device-to-host transfer and, for TensorBoard, one event."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from llmtrain.compat import batches_that_stepped, tensorboard_file_writer, tensorboard_prefix


def log_step(trainer: pl.Trainer) -> int:
    """The step Lightning's `self.log` writes at: optimizer steps taken so far (it keeps counting through a
    rollback, so the TensorBoard axis never runs backwards)."""
    return batches_that_stepped(trainer)


def log_values(trainer: pl.Trainer, metrics: dict[str, Tensor], step: int,
               host: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Moves scalar tensors to the host in one transfer and logs them, with `host` values, from rank 0; returns
    what it logged (empty elsewhere)."""
    if not trainer.is_global_zero or not (metrics or host):
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()]).tolist() if metrics else []
    logged = {**dict(zip(metrics, values)), **(host or {})}  # the one sync, above
    for logger in trainer.loggers:
        log_to(logger, logged, step)
    return logged


def log_to(logger: Logger, values: dict[str, float], step: int) -> None:
    """TensorBoard gets the values as one event: SummaryWriter.add_scalar builds and queues an event per scalar
    (67 ms for 720 values, WeightMonitor's count at 350M, on the 2-core CI machine; 1 ms as one event). Other
    loggers, and a TensorBoardLogger with a prefix (which log_metrics adds), go through log_metrics."""
    writer = logger.experiment if isinstance(logger, TensorBoardLogger) and not tensorboard_prefix(logger) else None
    if isinstance(writer, SummaryWriter):
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        tensorboard_file_writer(writer).add_summary(summary, step)  # what add_scalar ends in, once for all
    else:
        logger.log_metrics(values, step=step)
