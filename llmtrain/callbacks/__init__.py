"""Lightning callbacks: checkpoints, throughput/MFU, step profiling, stability metrics, loss-spike response."""

from llmtrain.callbacks.checkpoint import PeriodicCheckpoint
from llmtrain.callbacks.profile import StepProfiler
from llmtrain.callbacks.spikes import SpikeDetector, TrainingDiverged
from llmtrain.callbacks.stability import AttentionMonitor, LogitMonitor, WeightMonitor
from llmtrain.callbacks.throughput import Throughput

__all__ = ["AttentionMonitor", "LogitMonitor", "PeriodicCheckpoint", "SpikeDetector", "StepProfiler", "Throughput",
           "TrainingDiverged", "WeightMonitor"]
