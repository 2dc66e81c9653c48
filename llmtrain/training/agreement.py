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


class StepAgreement:
    """A flag that any one rank can raise and all ranks act on at the same step.

    Call `submit` at the same step boundaries on every rank (each call is a collective). On one process it returns
    the flag given; across processes it returns the previous call's flag, raised if any rank raised it (False at
    the first call).
    """

    def __init__(self) -> None:
        self._pending: Optional[tuple[torch.Tensor, Optional[torch.cuda.Event]]] = None

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
        if local.is_cuda:
            host = torch.empty(local.shape, dtype=local.dtype, pin_memory=True)
            host.copy_(local, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        else:  # gloo on CPU tensors: the all-reduce has completed on return
            self._pending = (local, None)
        return agreed

    def _read(self) -> bool:
        if self._pending is None:
            return False
        host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # up to this copy only: the GPU keeps the work queued after it
        return bool(host.item())


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
