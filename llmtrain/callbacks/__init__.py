"""Lightning callbacks: progress in steps, throughput/MFU, step profiling, host-synchronization audit, stability
metrics, loss-spike response; and, from llmtrain.checkpointing, the periodic checkpoints (configs name it here)."""

from llmtrain.callbacks.profile import StepProfiler
from llmtrain.callbacks.progress import StepProgress
from llmtrain.callbacks.spikes import SpikeDetector, TrainingDiverged
from llmtrain.callbacks.stability import AttentionMonitor, LogitMonitor, WeightMonitor
from llmtrain.callbacks.sync_audit import SyncAudit
from llmtrain.callbacks.throughput import Throughput
from llmtrain.checkpointing.periodic import PeriodicCheckpoint

__all__ = ["AttentionMonitor", "LogitMonitor", "PeriodicCheckpoint", "SpikeDetector", "StepProfiler", "StepProgress",
           "SyncAudit", "Throughput", "TrainingDiverged", "WeightMonitor"]
