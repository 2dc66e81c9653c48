"""SyncAudit: the host synchronizations of a few training steps, each with the Python call site that made it."""

from __future__ import annotations

import collections
import traceback
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's text in sync debug mode "warn"
# Frames that are the machinery, not the call site: the warning's own path and this module.
_MACHINERY = ("/warnings.py", "/sync_audit.py")


class SyncAudit(pl.Callback):
    """Records, for `num_steps` optimizer steps from `start_step`, every CUDA call that makes the host wait until the
    GPU has run everything queued: torch's sync debug mode ("warn") reports `.item()`, `.cpu()`, `.tolist()` and
    `bool()` of a device tensor, a blocking device-to-host copy, `torch.cuda.synchronize`, `nonzero` and the like.
    Each one empties the GPU's queue, which then idles until the host has launched its next kernels, so a training
    step should make none. Not reported: a wait for one event (HostCopy's read of a pinned copy, which waits for
    the kernels before it only), and the driver's own wait in a copy from pageable host memory.

    The window runs from the batch start of `start_step` to the batch start `num_steps` steps later: every hook of
    those steps, and the next batch's fetch and transfer. `syncs` holds (global step, stack) per synchronization,
    innermost frame last; `output` (a file path), a markdown report grouped by call site, from rank 0. A run
    that does not train on CUDA has nothing to audit, and a warning says so.
    """

    def __init__(self, start_step: int = 10, num_steps: int = 10, output: Optional[str] = None) -> None:
        if start_step < 0 or num_steps < 1:
            raise ValueError(f"SyncAudit: start_step={start_step} must be >= 0 and num_steps={num_steps} >= 1")
        self.start_step, self.num_steps, self.output = start_step, num_steps, output
        self.syncs: list[tuple[int, list[traceback.FrameSummary]]] = []
        self._trainer: Optional[pl.Trainer] = None
        self._first = start_step
        self._catch: Optional[warnings.catch_warnings] = None  # while recording: restores the warning settings
        self._done = False

    # -- the window ---------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if self._catch is not None and step >= self.start_step + self.num_steps:
            self._stop(trainer)
        elif self._catch is None and not self._done and step >= self.start_step:
            self._start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._catch is not None:
            self._stop(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._catch is not None:
            self._stop(trainer)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trains_on_cuda(pl_module):
            rank_zero_warn("SyncAudit: the model is not on a CUDA device, so there is no host synchronization to "
                           "find; nothing is audited")
            self._done = True
            return
        self._trainer, self._first = trainer, trainer.global_step
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        self._showwarning = warnings.showwarning  # for every other warning
        warnings.filterwarnings("always", message=SYNC_WARNING)  # every one, not the first per call site
        warnings.showwarning = self._record
        set_debug_mode("warn")

    def _stop(self, trainer: pl.Trainer) -> None:
        set_debug_mode("default")
        self._catch.__exit__(None, None, None)
        self._catch, self._done = None, True
        if self.output and trainer.is_global_zero:
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
            Path(self.output).write_text(self.report(trainer.global_step - self._first))

    def _record(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                line: Optional[str] = None) -> None:
        if SYNC_WARNING not in str(message):
            self._showwarning(message, category, filename, lineno, file, line)
            return
        stack = [frame for frame in traceback.extract_stack() if not frame.filename.endswith(_MACHINERY)]
        self.syncs.append((self._trainer.global_step, stack))

    # -- the report ---------------------------------------------------------------------------------------------
    def report(self, steps: int) -> str:
        lines = [f"# Host synchronizations: {steps} steps from step {self._first}", "",
                 f"{len(self.syncs)} synchronizations ({len(self.syncs) / max(steps, 1):.1f} per step)."]
        if not self.syncs:
            return "\n".join(lines) + "\n"
        sites: dict[str, list[int]] = collections.defaultdict(list)
        context: dict[str, str] = {}
        for step, stack in self.syncs:
            site = call_site(stack)
            sites[site].append(step)
            context.setdefault(site, " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                                for f in reversed(stack[-6:-1])))
        lines += ["", "| count | steps | call site | callers (innermost first) |", "|---|---|---|---|"]
        for site, at in sorted(sites.items(), key=lambda item: -len(item[1])):
            shown = ", ".join(map(str, sorted(set(at))[:8])) + (" …" if len(set(at)) > 8 else "")
            lines.append(f"| {len(at)} | {shown} | `{site}` | {context[site]} |")
        return "\n".join(lines) + "\n"


def trains_on_cuda(pl_module: pl.LightningModule) -> bool:
    return pl_module.device.type == "cuda"


def set_debug_mode(mode: str) -> None:
    torch.cuda.set_sync_debug_mode(mode)


def call_site(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame of the stack, with its source line: the call that synchronized."""
    frame = stack[-1]
    return f"{frame.filename}:{frame.lineno} {frame.name}: {(frame.line or '').strip()}"
