"""Lightning callbacks: throughput/MFU, step profiling, stability metrics, loss-spike response; and, from
llmtrain.checkpointing, the periodic checkpoints (configs name it here)."""

from llmtrain.callbacks.profile import StepProfiler
from llmtrain.callbacks.spikes import SpikeDetector, TrainingDiverged
from llmtrain.callbacks.stability import AttentionMonitor, LogitMonitor, WeightMonitor
from llmtrain.callbacks.throughput import Throughput
from llmtrain.checkpointing.periodic import PeriodicCheckpoint

__all__ = ["AttentionMonitor", "LogitMonitor", "PeriodicCheckpoint", "SpikeDetector", "StepProfiler", "Throughput",
           "TrainingDiverged", "WeightMonitor"]
