"""A step's scalars to the loggers: the module's per-step train/* values and the stability callbacks', each step's
in one device-to-host transfer and, for TensorBoard, one event. The module's are written a step late
(DeferredStepLog), so that logging them never drains the GPU's queue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from llmtrain.compat import batches_that_stepped, tensorboard_file_writer, tensorboard_prefix
from llmtrain.training.agreement import HostCopy


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
    values = _stacked(metrics).tolist() if metrics else []  # the one sync
    return _write(trainer, dict(zip(metrics, values)), host or {}, step)


def _stacked(metrics: dict[str, Tensor]) -> Tensor:
    return torch.stack([v.detach().float().reshape(()) for v in metrics.values()])


def _write(trainer: pl.Trainer, values: dict[str, float], host: dict[str, float], step: int) -> dict[str, float]:
    logged = {**values, **host}
    for logger in trainer.loggers:
        log_to(logger, logged, step)
    return logged


@dataclass
class _Pending:
    step: int  # the loggers'
    global_step: int  # optimizer steps done by then (the loggers' step keeps counting through a rollback)
    tags: list[str]
    values: Optional[HostCopy]  # the device values, stacked, on their way to pinned host memory
    host: dict[str, float]


class DeferredStepLog:
    """log_values without its sync. A logging step's device values are stacked and copied to pinned host memory
    behind the kernels that compute them (HostCopy), and written at the next `flush`, a step boundary later: by then
    the GPU has (nearly always) passed them, and any wait is for them alone, with the next step queued behind, so the
    GPU never idles for the host. Read at once (log_values), they would wait for the whole step, and the GPU would
    idle until the host had launched the next step's first kernels.

    `last` is what was written most recently, (trainer.global_step when it was submitted, values); the progress bar
    shows it.
    """

    def __init__(self) -> None:
        self._pending: Optional[_Pending] = None
        self.last: Optional[tuple[int, dict[str, float]]] = None

    def submit(self, trainer: pl.Trainer, metrics: dict[str, Tensor], step: int,
               host: Optional[dict[str, float]] = None) -> None:
        """Queues this step's values (rank 0's; other ranks log nothing), after writing any still pending."""
        self.flush(trainer)
        if trainer.is_global_zero and (metrics or host):
            self._pending = _Pending(step, trainer.global_step, list(metrics),
                                     HostCopy(_stacked(metrics)) if metrics else None, dict(host or {}))

    def flush(self, trainer: pl.Trainer) -> None:
        """Writes the pending values, if any: a step boundary after their submit, the end of training, an error."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        values = pending.values.get().tolist() if pending.values is not None else []
        self.last = (pending.global_step, _write(trainer, dict(zip(pending.tags, values)), pending.host, pending.step))


class FlushStepLog(pl.Callback):
    """Writes a DeferredStepLog's last values where training ends without another step boundary: at its end, and
    at an error (the values of the steps just before a failure are the ones its diagnosis needs)."""

    def __init__(self, step_log: DeferredStepLog) -> None:
        self.step_log = step_log

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step_log.flush(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            self.step_log.flush(trainer)
        except Exception as error:  # e.g. the CUDA error being raised: it, not this, is what the user must see
            rank_zero_warn(f"the last logged step's train/* values could not be written: {error}")


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
