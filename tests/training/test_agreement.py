"""StepAgreement's one-step lag on a process group, its device path included (CUDA and NCCL when there is a GPU):
a one-rank group whose trainer claims two ranks, so every call takes the collective path."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from llmtrain.training.agreement import StepAgreement

BACKENDS = [pytest.param("gloo", "cpu", id="gloo-cpu"),
            pytest.param("nccl", "cuda", id="nccl-cuda",
                         marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_each_call_returns_the_flag_of_the_call_before(backend: str, device: str) -> None:
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device(device)))
        agreement = StepAgreement()
        assert [agreement.submit(trainer, flag) for flag in (True, False, False, True, True)] == \
               [False, True, False, False, True]
        agreement.reset()  # a new fit: what the last call submitted is not acted on
        assert agreement.submit(trainer, False) is False
    finally:
        dist.destroy_process_group()


def test_on_one_process_the_flag_is_returned_at_once() -> None:
    trainer = SimpleNamespace(world_size=1)
    assert [StepAgreement().submit(trainer, flag) for flag in (True, False)] == [True, False]
