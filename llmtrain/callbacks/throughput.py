"""Tokens/s, model FLOPs utilisation and peak GPU memory: train/tokens_per_sec, train/mfu, train/gpu_mem_peak_gib."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

# Dense bf16 datasheet peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name() in this order
# (the first key the name contains wins: the PCIe and NVL H100s before the SXM one, "L40S" before "L4").
# Not Lightning's get_available_flops: in lightning 2.6 it gives the H100 NVL and H200 their 2:4-sparsity
# figures (~2x the dense peak) and returns None for the name "NVIDIA H200".
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_tflops_for(device_name: str) -> Optional[float]:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


class HostClock:
    """Window edges on the host's clock (a CPU run: the host does the work)."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float, wait: bool) -> Optional[float]:
        return end - start


class DeviceClock:
    """Window edges as CUDA events in the stream: the time the GPU took between them, queue and idle gaps included,
    whatever the host's lead over it. A host timestamp at a step boundary is off by that lead (up to about a step,
    and it changes at every host sync); an event is read once the GPU has passed it, without a sync."""

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event, wait: bool) -> Optional[float]:
        if not wait and not end.query():
            return None
        end.synchronize()
        return start.elapsed_time(end) / 1e3


@dataclass
class _Window:
    start: Any  # the clock's marks
    end: Any
    tokens: int
    step: int  # global_step at its end: the step it is logged at
    flops_per_token: float


class Throughput(pl.Callback):
    """Measures training throughput over windows of `window` optimizer steps, on every rank's clock: the GPU's (CUDA
    events, reported once the GPU has passed a window's end, within a step or two) or, on CPU, the host's.

    MFU = tokens/s · flops_per_token / (peak · world_size), with flops_per_token = 6·N_matmul +
    12·n_layer·n_head·head_dim·seq (ModelConfig.flops_per_token; N_matmul excludes the input embedding).
    The peak is `peak_tflops`, or the bf16 datasheet figure of the GPU found; on a device with no known
    peak (a CPU) MFU is not logged, and a warning says so once.
    """

    def __init__(self, window: int = 10, warmup_steps: int = 2, peak_tflops: Optional[float] = None) -> None:
        if window < 1 or warmup_steps < 0:
            raise ValueError(f"Throughput: window={window} must be >= 1 and warmup_steps={warmup_steps} >= 0")
        self.window = window
        self.warmup_steps = warmup_steps
        self.peak_tflops = peak_tflops
        self._clock: Any = HostClock()
        self._start: Any = None
        self._tokens = 0
        self._steps = 0
        self._pending: list[_Window] = []  # closed windows not yet reported
        self._cuda = False
        self.last_metrics: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cuda = pl_module.device.type == "cuda"  # not merely a GPU present: a CPU run beside one has no peak
        self._clock = self._make_clock(pl_module)
        self._start, self._tokens, self._steps, self._pending = None, 0, 0, []
        if self.peak_tflops is None and self._cuda:
            self.peak_tflops = peak_tflops_for(torch.cuda.get_device_name(pl_module.device))
        if self.peak_tflops is None:
            rank_zero_warn("Throughput: no peak FLOP/s known for this device; train/mfu is not logged "
                           "(set peak_tflops to log it).")

    def _make_clock(self, pl_module: pl.LightningModule) -> Any:
        return DeviceClock() if self._cuda else HostClock()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.warmup_steps:  # compile and allocator warm-up are not throughput
            self._count(trainer, pl_module, batch)
        self._report(trainer, wait=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report(trainer, wait=True)

    def _count(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if self._start is None:
            self._start = self._clock.mark()
            return
        self._tokens += batch["input_ids"].numel() * trainer.world_size
        self._steps += 1
        if self._steps < self.window * trainer.accumulate_grad_batches:
            return
        end = self._clock.mark()
        flops = pl_module.config.flops_per_token(batch["input_ids"].shape[1])
        self._pending.append(_Window(self._start, end, self._tokens, trainer.global_step, flops))
        self._start, self._tokens, self._steps = end, 0, 0

    def _report(self, trainer: pl.Trainer, wait: bool) -> None:
        """Logs the closed windows whose end the clock has passed, oldest first (all of them with `wait`)."""
        while self._pending:
            window = self._pending[0]
            seconds = self._clock.seconds(window.start, window.end, wait)
            if seconds is None:
                return
            self._pending.pop(0)
            tokens_per_sec = window.tokens / seconds
            metrics = {"train/tokens_per_sec": tokens_per_sec}
            if self.peak_tflops is not None:
                metrics["train/mfu"] = (tokens_per_sec * window.flops_per_token /
                                        (self.peak_tflops * 1e12 * trainer.world_size))
            if self._cuda:  # the allocator's own counter: no device sync
                metrics["train/gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            self.last_metrics = metrics
            if trainer.is_global_zero:  # straight to the loggers: the window need not align with log_every_n_steps
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=window.step)
