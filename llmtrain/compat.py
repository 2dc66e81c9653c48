"""The few private attributes of Lightning, DeepSpeed and torch that llmtrain still needs, each behind one function.

Everything else uses public APIs. Each touchpoint here has a test in tests/test_compat.py that fails loudly (naming
the attribute and the library version) when an upgrade removes or changes it, so a version bump breaks one test
instead of a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from datetime import timedelta

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard import SummaryWriter


# ------------------------------------------------------------------------- Lightning's loop state (step_log, module)


def batches_that_stepped(trainer: "pl.Trainer") -> int:
    """The step Lightning's own `self.log` writes at (`epoch_loop._batches_that_stepped`): optimizer steps taken so
    far, which keeps counting through a SpikeDetector rollback (global_step goes back), so a TensorBoard axis that
    uses it never runs backwards. No public counter has that property."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def should_accumulate(trainer: "pl.Trainer") -> bool:
    """Whether the current batch is inside gradient accumulation (not the step's last micro-batch), by Lightning's
    own rule (`fit_loop._should_accumulate()`), which also knows when the strategy accumulates itself (DeepSpeed)."""
    return trainer.fit_loop._should_accumulate()


# --------------------------------------------------------------------------------------- TensorBoard (step_log)


def tensorboard_prefix(logger: "TensorBoardLogger") -> str:
    """The `prefix` a TensorBoardLogger adds to every tag in log_metrics (stored only as `_prefix`)."""
    return logger._prefix


def tensorboard_file_writer(writer: "SummaryWriter") -> Any:
    """torch's SummaryWriter's event-file writer (`_get_file_writer()`), whose `add_summary` writes many scalars
    as one event: add_scalar builds an event per scalar (67 ms for 720 values against 1 ms, on 2 CPU cores)."""
    return writer._get_file_writer()


# ------------------------------------------------------------------------ ModelCheckpoint (PeriodicCheckpoint)


def set_train_time_interval(callback: "ModelCheckpoint", interval: "Optional[timedelta]") -> None:
    """ModelCheckpoint's time trigger (`_train_time_interval`), set beside a step trigger: its batch-end logic
    honours both, only its constructor refuses the pair."""
    callback._train_time_interval = interval


def save_checkpoint_now(callback: "ModelCheckpoint", trainer: "pl.Trainer") -> None:
    """A save of the current step through ModelCheckpoint's own path (top-k rotation, then `last`), unless this
    step was saved already (`_should_skip_saving_checkpoint`, `_save_topk_checkpoint`, `_save_last_checkpoint`)."""
    if callback._should_skip_saving_checkpoint(trainer):
        return
    candidates = callback._monitor_candidates(trainer)
    callback._save_topk_checkpoint(trainer, candidates)
    callback._save_last_checkpoint(trainer, candidates)
