"""Lightning callbacks: checkpoints, throughput/MFU, stability metrics, loss-spike response."""

from llmtrain.callbacks.checkpoint import PeriodicCheckpoint
from llmtrain.callbacks.spikes import SpikeDetector, TrainingDiverged
from llmtrain.callbacks.stability import AttentionMonitor, LogitMonitor, WeightMonitor
from llmtrain.callbacks.throughput import Throughput

__all__ = ["AttentionMonitor", "LogitMonitor", "PeriodicCheckpoint", "SpikeDetector", "Throughput",
           "TrainingDiverged", "WeightMonitor"]
