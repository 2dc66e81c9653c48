"""Tokens/s, model FLOPs utilisation and peak GPU memory: train/tokens_per_sec, train/mfu, train/gpu_mem_peak_gib."""

from __future__ import annotations

import time
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


class Throughput(pl.Callback):
    """Measures training throughput over windows of `window` optimizer steps, on every rank's clock.

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
        self._start: Optional[float] = None
        self._tokens = 0
        self._steps = 0
        self.last_metrics: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.peak_tflops is None and torch.cuda.is_available():
            self.peak_tflops = peak_tflops_for(torch.cuda.get_device_name())
        if self.peak_tflops is None:
            rank_zero_warn("Throughput: no peak FLOP/s known for this device; train/mfu is not logged "
                           "(set peak_tflops to log it).")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step < self.warmup_steps:  # compile and allocator warm-up are not throughput
            return
        now = time.perf_counter()
        if self._start is None:
            self._start = now
            return
        self._tokens += batch["input_ids"].numel() * trainer.world_size
        self._steps += 1
        if self._steps < self.window * trainer.accumulate_grad_batches:
            return
        tokens_per_sec = self._tokens / (now - self._start)
        metrics = {"train/tokens_per_sec": tokens_per_sec}
        if self.peak_tflops is not None:
            flops = tokens_per_sec * pl_module.config.flops_per_token(batch["input_ids"].shape[1])
            metrics["train/mfu"] = flops / (self.peak_tflops * 1e12 * trainer.world_size)
        if torch.cuda.is_available():  # the allocator's own counter: no device sync
            metrics["train/gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.last_metrics = metrics
        if trainer.is_global_zero:  # straight to the loggers: the window need not align with log_every_n_steps
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self._start, self._tokens, self._steps = now, 0, 0
