"""Periodic checkpoints: every N steps and every T minutes, `last` plus the k newest."""

from __future__ import annotations

from datetime import timedelta
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint


class PeriodicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that saves on either trigger (Lightning allows only one) and keeps the `keep` newest.

    `last.ckpt` is a link to the newest save, so `llmtrain fit --ckpt_path last` resumes from it. Saves are
    atomic: Lightning writes single files through an fsspec transaction (temp file + rename), and
    ZeroStrategy renames whole DeepSpeed folders into place.
    """

    def __init__(self, dirpath: Optional[str] = None, every_n_steps: Optional[int] = 1000,
                 every_minutes: Optional[float] = None, keep: int = 3) -> None:
        if every_n_steps is None and every_minutes is None:
            raise ValueError("PeriodicCheckpoint: set every_n_steps, every_minutes or both")
        if (every_n_steps is not None and every_n_steps < 1) or (every_minutes is not None and every_minutes <= 0):
            raise ValueError(f"PeriodicCheckpoint: every_n_steps={every_n_steps} must be >= 1 and "
                             f"every_minutes={every_minutes} > 0")
        if keep < 1:
            raise ValueError(f"PeriodicCheckpoint: keep={keep} must be >= 1")
        super().__init__(dirpath=dirpath, filename="step{step:07d}", auto_insert_metric_name=False,
                         monitor="step", mode="max", save_top_k=keep, save_last="link",
                         every_n_train_steps=every_n_steps or 0, save_on_train_epoch_end=False,
                         # A resumed run must move `last` forward, not write last-v1 beside a stale last.
                         enable_version_counter=False)
        # ModelCheckpoint's batch-end logic honours both triggers; only its constructor refuses the pair.
        self._train_time_interval = timedelta(minutes=every_minutes) if every_minutes else None
