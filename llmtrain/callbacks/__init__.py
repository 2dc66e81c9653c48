"""Lightning callbacks: throughput/MFU, stability metrics, loss-spike response."""

from llmtrain.callbacks.throughput import Throughput

__all__ = ["Throughput"]
