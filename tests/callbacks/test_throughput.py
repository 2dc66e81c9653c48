"""Throughput's MFU peak: the datasheet figure of the GPU that torch names."""

from __future__ import annotations

import pytest

from llmtrain.callbacks.throughput import peak_tflops_for


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("Tesla T4", None),
])
def test_peak_is_the_named_gpus_dense_bf16_figure(name: str, peak) -> None:
    assert peak_tflops_for(name) == peak
