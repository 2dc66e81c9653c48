"""Throughput: its windows, reported at the step each one ends, on the host's clock and on a clock that, as CUDA
events do, is read only once the device has passed a window's end; and the MFU peak of the GPU torch names."""

from __future__ import annotations

import collections

import pytest
import torch

from llmtrain.callbacks import Throughput
from llmtrain.callbacks.throughput import DeviceClock, peak_tflops_for
from llmtrain.training.module import LanguageModel
from llmtrain.training.optim import OptimConfig
from tests.callbacks import fit, random_batches, tiny_config

OPTIM = OptimConfig(lr=3e-3, warmup_steps=1, total_steps=20)
TOKENS_PER_WINDOW = 2 * 4 * 16  # window=2 steps of 4 sequences of 16 tokens


class LaggingClock:
    """A mark is passed at the second time it is asked about (DeviceClock's event when the host runs a step
    ahead of the GPU); each window between two marks took 0.5 s."""

    def __init__(self) -> None:
        self.marks = 0
        self.asked: collections.Counter = collections.Counter()

    def mark(self) -> int:
        self.marks += 1
        return self.marks

    def seconds(self, start: int, end: int, wait: bool):
        self.asked[end] += 1
        if not wait and self.asked[end] < 2:
            return None
        return 0.5 * (end - start)


class LaggingThroughput(Throughput):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clock = LaggingClock()

    def _make_clock(self, pl_module):
        return self.clock


def test_windows_on_the_host_clock_are_logged_at_the_step_each_ends() -> None:
    _, logger = fit(LanguageModel(tiny_config(), OPTIM), random_batches(8), [Throughput(window=2, warmup_steps=1)],
                    max_steps=7)
    tps = logger.scalars["train/tokens_per_sec"]
    assert sorted(tps) == [3, 5, 7] and all(value > 0 for value in tps.values())


def test_a_window_the_clock_has_not_passed_yet_is_logged_later_at_its_own_step_and_none_is_lost() -> None:
    throughput = LaggingThroughput(window=2, warmup_steps=1)
    _, logger = fit(LanguageModel(tiny_config(), OPTIM), random_batches(8), [throughput], max_steps=7)
    # Windows from marks 1-2, 2-3 and 3-4 (each 0.5 s); the last closed at the final step and was read at train end
    assert logger.scalars["train/tokens_per_sec"] == {3: TOKENS_PER_WINDOW / 0.5, 5: TOKENS_PER_WINDOW / 0.5,
                                                      7: TOKENS_PER_WINDOW / 0.5}
    assert throughput.clock.asked[2] == 2  # not passed at the step it closed, passed at the next
    logged_order = [step for step, metrics in logger.rows if "train/tokens_per_sec" in metrics]
    assert logged_order == [3, 5, 7]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_windows_are_timed_by_cuda_events_and_all_logged() -> None:
    clock = DeviceClock()
    x = torch.randn(2048, 2048, device="cuda")
    start = clock.mark()
    for _ in range(50):
        x = torch.nn.functional.normalize(x @ x)
    end = clock.mark()
    assert clock.seconds(start, end, wait=True) > 0
    _, logger = fit(LanguageModel(tiny_config(), OPTIM), random_batches(8), [Throughput(window=2, warmup_steps=1)],
                    max_steps=7, accelerator="gpu")
    assert sorted(logger.scalars["train/tokens_per_sec"]) == [3, 5, 7]


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("Tesla T4", None),
])
def test_peak_is_the_named_gpus_dense_bf16_figure(name: str, peak) -> None:
    assert peak_tflops_for(name) == peak
