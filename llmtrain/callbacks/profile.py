"""Where a training step's time goes: torch.profiler over a few optimizer steps, written as a markdown report."""

from __future__ import annotations

import math
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

    On CUDA the next num_steps steps are traced again with kernel activity only, for the device timeline: how long
    the GPU waits between kernels, in gaps sorted by length. Recording every host op, as the first window does,
    slows the host (microseconds per op) and can open gaps a run without the profiler does not have; the
    kernel-only trace (CUPTI's record of each launch, no op recording) leaves the host close to its own speed.

    Each window is bracketed by torch.cuda.synchronize(), so it perturbs nothing after it but must not overlap a
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
        self._window_start = 0  # the global_step the running window started at
        self._t0 = 0.0
        self._tables: Optional[tuple[Any, Any, int, float]] = None  # the first window: events, by shape, steps, wall
        self._timeline: Optional[list[str]] = None  # the second window's report section
        self._done = False
        self._cuda = False  # the run trains on a CUDA device (not merely one present)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # trainer.log_dir broadcasts from rank 0, so every rank must ask for it, here, not rank 0 alone later
        self._path = self.output or os.path.join(trainer.log_dir or trainer.default_root_dir, "profile.md")
        self._cuda = pl_module.device.type == "cuda"

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # A window runs from the first batch start of its first step to the first batch start after its last (or the
        # end of training), so every callback's batch-end work of its steps is inside it, wherever this callback
        # sits in the list; put it first to also take in the others' batch-start work (the monitors' probes).
        step = trainer.global_step
        if self._prof is not None and step >= self._window_start + self.num_steps:
            if self._end_window(step - self._window_start) and self._cuda:
                self._start_window(step, [ProfilerActivity.CUDA])  # the kernel-only timeline window
            else:
                self._write()
        if trainer.is_global_zero and self._tables is None and self._prof is None and step == self.start_step:
            self._start_window(step, [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._cuda else []))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self._prof is not None:  # training stopped inside a window: report the steps it did record
            self._end_window(trainer.global_step - self._window_start)
            self._write()
        elif not self._done:
            rank_zero_warn(f"StepProfiler: no step profiled, training ended at global_step={trainer.global_step} "
                           f"without starting step start_step={self.start_step}; no report written.")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._prof is not None:  # a profiler left running blocks the next one in this process
            self._prof.stop()
            self._prof = None

    def _start_window(self, step: int, activities: list[ProfilerActivity]) -> None:
        self._prof = torch.profiler.profile(activities=activities, record_shapes=ProfilerActivity.CPU in activities)
        if self._cuda:
            torch.cuda.synchronize()  # the previous step's kernels are not this window's
        self._prof.start()
        self._window_start, self._t0 = step, time.perf_counter()

    def _end_window(self, steps: int) -> bool:
        """Stops the running window and keeps what the report needs from it: the tables' events from the first, the
        kernel timeline from the second. True after the first."""
        if self._cuda:
            torch.cuda.synchronize()  # the window's kernels have all run before the clock stops
        wall_us = (time.perf_counter() - self._t0) * 1e6
        prof, self._prof = self._prof, None
        prof.stop()
        if self._tables is None:
            self._tables = (prof.key_averages(), prof.key_averages(group_by_input_shape=True), steps, wall_us)
            return True
        if steps >= 1:
            self._timeline = timeline_lines(prof, steps, wall_us)
        return False

    def _write(self) -> None:
        self._done = True
        events, by_shape, steps, wall_us = self._tables
        if steps < 1:  # stopped before the window's first optimizer step: no per-step figure to give
            rank_zero_warn(f"StepProfiler: training ended inside step start_step={self.start_step}; no report.")
            return
        os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
        with open(self._path, "w") as f:
            f.write(profile_report(events, steps, wall_us, self._cuda, self.row_limit, by_shape, self._timeline))


def profile_report(events: Any, steps: int, wall_us: float, cuda: bool, row_limit: int = 25, by_shape: Any = None,
                   timeline: Optional[list[str]] = None) -> str:
    """The markdown report of `steps` profiled steps (torch.profiler key_averages()) that took `wall_us` in all:
    for a run on CUDA (`cuda`), device time per kernel category and the top kernels; on CPU, the top ops. With
    `by_shape` (key_averages(group_by_input_shape=True) of a profile that recorded shapes), also the matmuls by
    shape; with `timeline` (timeline_lines of a kernel-only trace), the device timeline."""
    device = torch.cuda.get_device_name() if cuda else "CPU"
    lines = [f"# Step profile: {device}, {steps} steps recorded, {wall_us / steps / 1e3:.2f} ms wall per step", ""]
    lines += (device_tables if cuda else cpu_table)(events, steps, wall_us, row_limit)
    if by_shape is not None:
        lines += matmul_shape_table(by_shape, steps, wall_us, row_limit, cuda)
    return "\n".join(lines + (timeline or [])) + "\n"


# Idle gaps between kernels by length (upper bound in µs, label). Under ~5 µs the GPU is only spacing kernels it
# already has queued; longer gaps are time it waited for the host: a launch not made yet, or a sync that drained
# the queue (a host read of a device value, a blocking copy) and the host work until the next launch.
GAP_BINS = ((5.0, "under 5 µs"), (50.0, "5 to 50 µs"), (500.0, "50 to 500 µs"), (math.inf, "500 µs and over"))


def timeline_lines(prof: torch.profiler.profile, steps: int, wall_us: float, longest: int = 5) -> list[str]:
    """The device timeline section of a kernel-only trace of `steps` steps that took `wall_us`."""
    try:
        kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    except Exception as err:  # a diagnostic: a profiler that changed its events must not stop a training run
        return ["", "## Device timeline", "", f"Not available: the kernel-only trace could not be read ({err!r})."]
    return device_timeline(kernels, steps, wall_us, longest)


def device_timeline(kernels: list[tuple[str, float, float]], steps: int, wall_us: float,
                    longest: int = 5) -> list[str]:
    """Busy and idle device time of `steps` steps from their kernels' (name, start µs, end µs), overlapping ones
    (several streams) merged: the idle gaps between kernels by length, and the longest with their neighbours."""
    lines = ["", "## Device timeline (the next steps, traced with kernel activity only)", "",
             ("The host records no ops here, so it runs close to its own speed. Gaps under 5 µs are the GPU spacing "
              "kernels it has queued; longer ones are time it waited for the host: a launch not made yet, or a sync "
              "that drained the queue and the host work until the next launch."), ""]
    if not kernels:
        return lines + ["No kernel was recorded."]
    kernels = sorted(kernels, key=lambda k: k[1])
    gaps: list[tuple[float, str, str]] = []  # (length, the kernel before it, the kernel after it)
    busy, (last, run_start, run_end) = 0.0, kernels[0]
    for name, start, end in kernels[1:]:
        if start > run_end:
            gaps.append((start - run_end, last, name))
            busy, run_start = busy + run_end - run_start, start
        if end >= run_end:
            last, run_end = name, end
    busy += run_end - run_start
    between = sum(gap for gap, _, _ in gaps)
    outside = max(0.0, wall_us - (run_end - kernels[0][1]))
    lines += ["| per step | ms | % of wall |", "|---|---:|---:|"]
    for what, us in (("wall", wall_us), ("kernels running", busy), ("idle between kernels", between),
                     ("idle before the first and after the last kernel", outside)):
        lines.append(f"| {what} | {us / steps / 1e3:.3f} | {100 * us / wall_us:.1f} |")
    lines += ["", f"{len(kernels) / steps:,.0f} kernels, copies and sets per step.", "",
              "| idle gap | gaps per step | ms per step | % of wall |", "|---|---:|---:|---:|"]
    low = 0.0
    for high, label in GAP_BINS:
        inside = [gap for gap, _, _ in gaps if low <= gap < high]
        lines.append(f"| {label} | {len(inside) / steps:,.1f} | {sum(inside) / steps / 1e3:.3f} | "
                     f"{100 * sum(inside) / wall_us:.1f} |")
        low = high
    lines += ["", f"### The {longest} longest gaps", "", "| gap (µs) | after kernel | before kernel |", "|---:|---|---|"]
    for gap, before, after in sorted(gaps, reverse=True)[:longest]:
        lines.append(f"| {gap:,.1f} | {cell(before, 70)} | {cell(after, 70)} |")
    return lines


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
