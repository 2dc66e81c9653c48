"""llmtrain.compat: every private touchpoint still exists and behaves as llmtrain relies on."""

from __future__ import annotations


# ---------------------------------------------------------------------- Lightning's loop state, TensorBoard writer

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.demos.boring_classes import BoringModel  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: E402

from llmtrain import compat  # noqa: E402


class _LoopStateProbe(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.seen.append((compat.batches_that_stepped(trainer), compat.should_accumulate(trainer)))


def test_loop_state_counts_optimizer_steps_and_knows_accumulation(tmp_path) -> None:
    probe = _LoopStateProbe()
    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[probe], default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    # Six micro-batches: steps 0,0,1,1,2,2 before each; every second one ends an optimizer step.
    assert probe.seen == [(0, True), (0, False), (1, True), (1, False), (2, True), (2, False)], \
        f"lightning {pl.__version__}: _batches_that_stepped / _should_accumulate changed"


def test_tensorboard_prefix_and_file_writer_write_one_event(tmp_path) -> None:
    logger = TensorBoardLogger(tmp_path, name="", version="", prefix="pre")
    assert compat.tensorboard_prefix(logger) == "pre"
    summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in (("a", 1.0), ("b", 2.0))])
    compat.tensorboard_file_writer(logger.experiment).add_summary(summary, 7)
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path)).Reload()
    assert {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in ("a", "b")} == \
        {"a": [(7, 1.0)], "b": [(7, 2.0)]}, f"torch {torch.__version__}: SummaryWriter._get_file_writer changed"
