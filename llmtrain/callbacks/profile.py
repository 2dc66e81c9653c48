"""Where a training step's time goes: torch.profiler over a few optimizer steps, written as a markdown report."""

from __future__ import annotations

import os
import re
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.profiler import ProfilerActivity

OTHER_KERNELS = "other kernels"

# Kernel name (lower-cased) -> category; the first pattern that matches wins, so the order is part of the table.
# Inductor names its kernels after the aten ops fused into them ("triton_poi_fused__scaled_dot_product_..."), so
# the triton_ prefix comes first; attention before matmul, because FlashAttention and cuDNN SDPA kernels carry
# "cutlass"/"wgmma" in their names; multi_tensor_apply also covers foreach grad-norm clipping.
KERNEL_CATEGORIES = (
    ("compiled fused (triton)", re.compile(r"^triton_")),
    ("communication", re.compile(r"nccl")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa")),
    ("matmul", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|cublas|wgmma")),
    ("optimizer", re.compile(r"adam|multi_tensor_apply")),
    ("memory copies/sets", re.compile(r"^memcpy|^memset")),
)


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, pattern in KERNEL_CATEGORIES:
        if pattern.search(lowered):
            return category
    return OTHER_KERNELS


# The ops a matmul kernel is launched from, whose input shapes the shape table groups by (inductor's compiled code
# calls them too, as extern kernels).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm")


def self_device_us(evt: Any) -> float:
    # self_device_time_total since torch 2.4; older torch names it self_cuda_time_total (deprecated since)
    value = getattr(evt, "self_device_time_total", None)
    return float(value if value is not None else evt.self_cuda_time_total)


def device_us(evt: Any) -> float:
    """The device time of the kernels an op launched (its children included)."""
    value = getattr(evt, "device_time_total", None)
    return float(value if value is not None else evt.cuda_time_total)


def cell(name: str, limit: int = 100) -> str:
    name = name if len(name) <= limit else name[:limit - 1] + "…"
    return name.replace("|", "\\|")


class StepProfiler(pl.Callback):
    """Profiles optimizer steps start_step .. start_step+num_steps-1 on global rank 0 and writes `output` (markdown,
    default <log_dir>/profile.md): on CUDA, device time per kernel category and the top kernels; on CPU, the top ops.

    The window is bracketed by torch.cuda.synchronize(), so it perturbs nothing after it but must not overlap a
    timed window. Steps are counted by trainer.global_step, so gradient accumulation is profiled whole.
    """

    def __init__(self, start_step: int, num_steps: int = 5, output: Optional[str] = None,
                 row_limit: int = 25) -> None:
        if start_step < 1:
            raise ValueError(f"StepProfiler: start_step={start_step} must be >= 1 (step 0 is compile/warm-up)")
        if num_steps < 1:
            raise ValueError(f"StepProfiler: num_steps={num_steps} must be >= 1")
        if row_limit < 1:
            raise ValueError(f"StepProfiler: row_limit={row_limit} must be >= 1")
        self.start_step = start_step
        self.num_steps = num_steps
        self.output = output
        self.row_limit = row_limit
        self._path: Optional[str] = None
        self._prof: Optional[torch.profiler.profile] = None
        self._t0 = 0.0
        self._done = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # trainer.log_dir broadcasts from rank 0, so every rank must ask for it, here, not rank 0 alone later
        self._path = self.output or os.path.join(trainer.log_dir or trainer.default_root_dir, "profile.md")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # The window runs from the first batch start of step start_step to the first batch start after it (or the
        # end of training), so every callback's batch-end work of its steps is inside it, wherever this callback
        # sits in the list; put it first to also take in the others' batch-start work (the monitors' probes).
        if self._prof is not None and trainer.global_step >= self.start_step + self.num_steps:
            self._finish(trainer.global_step - self.start_step)
        if not trainer.is_global_zero or self._done or self._prof is not None:
            return
        if trainer.global_step != self.start_step:
            return
        cuda = torch.cuda.is_available()
        self._prof = torch.profiler.profile(
            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []), record_shapes=True)
        if cuda:
            torch.cuda.synchronize()  # the previous step's kernels are not this window's
        self._prof.start()
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self._prof is not None:  # training stopped inside the window: report the steps it did record
            self._finish(trainer.global_step - self.start_step)
        elif not self._done:
            rank_zero_warn(f"StepProfiler: no step profiled, training ended at global_step={trainer.global_step} "
                           f"without starting step start_step={self.start_step}; no report written.")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._prof is not None:  # a profiler left running blocks the next one in this process
            self._prof.stop()
            self._prof = None

    def _finish(self, steps: int) -> None:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()  # the window's kernels have all run before the clock stops
        wall_us = (time.perf_counter() - self._t0) * 1e6
        self._prof.stop()
        events, by_shape = self._prof.key_averages(), self._prof.key_averages(group_by_input_shape=True)
        self._prof, self._done = None, True
        if steps < 1:  # stopped before the window's first optimizer step: no per-step figure to give
            rank_zero_warn(f"StepProfiler: training ended inside step start_step={self.start_step}; no report.")
            return
        os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
        with open(self._path, "w") as f:
            f.write(profile_report(events, steps, wall_us, self.row_limit, by_shape))


def profile_report(events: Any, steps: int, wall_us: float, row_limit: int = 25, by_shape: Any = None) -> str:
    """The markdown report of `steps` profiled steps (torch.profiler key_averages()) that took `wall_us` in all:
    on CUDA, device time per kernel category and the top kernels; on CPU, the top ops. With `by_shape`
    (key_averages(group_by_input_shape=True) of a profile that recorded shapes), also the matmuls by shape."""
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    lines = [f"# Step profile: {device}, {steps} steps recorded, {wall_us / steps / 1e3:.2f} ms wall per step", ""]
    lines += (device_tables if cuda else cpu_table)(events, steps, wall_us, row_limit)
    if by_shape is not None:
        lines += matmul_shape_table(by_shape, steps, wall_us, row_limit, cuda)
    return "\n".join(lines) + "\n"


def matmul_shape_table(events: Any, steps: int, wall_us: float, row_limit: int, cuda: bool) -> list[str]:
    """Each matmul op and input shapes with the time of its kernels (on CPU its self CPU time): two models of one
    shape, or two implementations of one model, compared GEMM by GEMM rather than by kernel name."""
    ops = [e for e in events if e.key in MATMUL_OPS]
    time_us = device_us if cuda else (lambda e: float(e.self_cpu_time_total))
    ops.sort(key=time_us, reverse=True)
    what = "device time of its kernels" if cuda else "self CPU time"
    lines = ["", f"## Top {row_limit} matmuls by input shapes ({what})", "",
             "| op | input shapes | calls | total ms | ms/step | % of wall |", "|---|---|---:|---:|---:|---:|"]
    for e in ops[:row_limit]:
        us = time_us(e)
        shapes = ", ".join(str(list(shape)) for shape in e.input_shapes if shape)
        lines.append(f"| {e.key} | {cell(shapes)} | {e.count} | {us / 1e3:.3f} | {us / steps / 1e3:.3f} | "
                     f"{100 * us / wall_us:.1f} |")
    return lines


def device_tables(events: Any, steps: int, wall_us: float, row_limit: int) -> list[str]:
    # record_function ranges (Optimizer.step#AdamW.step, ...) are mirrored on the device timeline as user
    # annotations that span kernels; counting them would count those kernels twice (as torch's own table avoids)
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
    per_category = {category: 0.0 for category, _ in KERNEL_CATEGORIES}
    per_category[OTHER_KERNELS] = 0.0
    for evt in kernels:
        per_category[kernel_category(evt.key)] += self_device_us(evt)
    idle = max(0.0, wall_us - sum(per_category.values()))
    lines = ["## Where the device time goes", "",
             ("Kernels on several streams (e.g. communication beside compute) can overlap, so the rows can sum "
              "past 100% and device idle is a lower bound."), "",
             "| category | ms/step | % of wall |", "|---|---:|---:|"]
    by_time = sorted(per_category.items(), key=lambda item: item[1], reverse=True)
    for category, us in [*by_time, ("device idle (wall − kernel time)", idle)]:
        lines.append(f"| {category} | {us / steps / 1e3:.3f} | {100 * us / wall_us:.1f} |")
    lines += ["", f"## Top {row_limit} kernels by device self time", ""]
    kernels.sort(key=self_device_us, reverse=True)
    return lines + table_rows("kernel", [(e.key, e.count, self_device_us(e)) for e in kernels], steps, wall_us,
                              row_limit)


def cpu_table(events: Any, steps: int, wall_us: float, row_limit: int) -> list[str]:
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    lines = ["The device-time category table needs CUDA; on CPU the top ops by self CPU time follow.", "",
             f"## Top {row_limit} ops by self CPU time", ""]
    return lines + table_rows("op", [(e.key, e.count, e.self_cpu_time_total) for e in ops], steps, wall_us, row_limit)


def table_rows(what: str, rows: list[tuple[str, int, float]], steps: int, wall_us: float,
               row_limit: int) -> list[str]:
    lines = [f"| {what} | calls | total ms | ms/step | % of wall |", "|---|---:|---:|---:|---:|"]
    for name, calls, us in rows[:row_limit]:
        lines.append(f"| {cell(name)} | {calls} | {us / 1e3:.3f} | {us / steps / 1e3:.3f} | "
                     f"{100 * us / wall_us:.1f} |")
    return lines
