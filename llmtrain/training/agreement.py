"""What ranks agree on at every step (save now? stop now? the step's mean loss) without stalling the GPU.

Reading a collective's result on the host right after launching it (Lightning's reduce_boolean_decision and
broadcast, which its ModelCheckpoint time trigger and its SIGTERM check run at every step) waits for everything the
GPU has queued before it: the queue drains at each step boundary, and the GPU idles until the host has launched the
next step's first kernels. Here a step's local flag goes into an all-reduce (MAX) on the device, the result is copied
to pinned host memory behind it, and it is read at the next step boundary, when the GPU is at most that one step
behind: every rank reads the same value at the same step, and the host never waits for work queued after it.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist


class HostCopy:
    """A device tensor's copy to pinned host memory, queued behind the kernels that compute it and read later: the read
    waits for those kernels only, not for the work the GPU has queued since. A CPU tensor is its own copy."""

    def __init__(self, value: torch.Tensor) -> None:
        self._event: Optional[torch.cuda.Event] = None
        self._host = value
        if value.is_cuda:
            self._host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def get(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self._host


class StepAgreement:
    """A flag that any one rank can raise and all ranks act on at the same step.

    Call `submit` at the same step boundaries on every rank (each call is a collective). On one process it returns
    the flag given; across processes it returns the previous call's flag, raised if any rank raised it (False at
    the first call).
    """

    def __init__(self) -> None:
        self._pending: Optional[HostCopy] = None

    def reset(self) -> None:
        """Forgets a submitted decision (a new fit starts its own sequence of calls)."""
        self._pending = None

    def submit(self, trainer: pl.Trainer, flag: bool) -> bool:
        if not _across_processes(trainer):
            return flag
        agreed = self._read()
        # torch.full puts the value in the kernel's arguments: no copy from pageable host memory (which would sync)
        local = torch.full((1,), int(flag), dtype=torch.int32, device=trainer.strategy.root_device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        self._pending = HostCopy(local)  # gloo on CPU tensors: the all-reduce has completed on return
        return agreed

    def _read(self) -> bool:
        pending, self._pending = self._pending, None
        return pending is not None and bool(pending.get().item())


def mean_over_ranks(trainer: pl.Trainer, value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over all ranks, left on the device. Not Lightning's strategy.reduce: it runs a barrier
    before every all-reduce, and NCCL's barrier synchronizes the host with the GPU's queue."""
    if not _across_processes(trainer):
        return value
    total = value.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / trainer.world_size


def _across_processes(trainer: pl.Trainer) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
