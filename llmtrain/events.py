"""Scalars in a run's TensorBoard events: written during training (the module's per-step values and the stability
callbacks', each step's in one transfer and one event) and read back (reports, sweeps, tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter


def log_step(trainer: pl.Trainer) -> int:
    """The step Lightning's `self.log` writes at: optimizer steps taken so far (it keeps counting through a
    rollback, so the TensorBoard axis never runs backwards)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


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
    writer = logger.experiment if isinstance(logger, TensorBoardLogger) and not logger._prefix else None
    if isinstance(writer, SummaryWriter):
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
        writer._get_file_writer().add_summary(summary, step)  # what add_scalar ends in, once for all
    else:
        logger.log_metrics(values, step=step)


def accumulators(run_dir: Union[str, Path]) -> Iterator[EventAccumulator]:
    """The loaded event files under `run_dir`, oldest first (a resumed run writes a new file)."""
    files = sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        raise FileNotFoundError(f"no TensorBoard event files under {run_dir}")
    for path in files:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        yield accumulator


def read_scalars(run_dir: Union[str, Path]) -> dict[str, dict[int, float]]:
    """tag -> {step: value} over every event file under `run_dir`; a later file wins a repeated step
    (a resumed run re-logs the steps after its checkpoint)."""
    scalars: dict[str, dict[int, float]] = {}
    for accumulator in accumulators(run_dir):
        for tag in accumulator.Tags()["scalars"]:
            series = scalars.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                series[event.step] = event.value
    return scalars


def wall_clock(run_dir: Union[str, Path], tag: str) -> dict[int, float]:
    """Seconds of training at each logged step of `tag`, from the run's first logged event; the gap between a
    stopped run and its resumption is left out (each event file is one segment, placed after the one before)."""
    clock, offset = {}, 0.0
    for accumulator in accumulators(run_dir):
        tags = accumulator.Tags()["scalars"]
        times = [e.wall_time for t in tags for e in accumulator.Scalars(t)]
        if not times:
            continue
        start = min(times)
        if tag in tags:
            for event in accumulator.Scalars(tag):
                clock[event.step] = offset + event.wall_time - start
        offset += max(times) - start
    return clock
