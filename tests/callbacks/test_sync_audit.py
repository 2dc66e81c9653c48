"""SyncAudit: every host synchronization inside its window, with its call site, and none outside it; on a GPU, a
shipped training step (logging steps, clipping, SpikeDetector, Throughput, checkpoint triggers) makes none."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from llmtrain.callbacks import PeriodicCheckpoint, SpikeDetector, SyncAudit, Throughput
from llmtrain.callbacks import sync_audit
from llmtrain.callbacks.preemption import PreemptionCheckpoint
from llmtrain.training.module import LanguageModel
from llmtrain.training.optim import OptimConfig
from tests.callbacks import CaptureLogger, fit, random_batches, tiny_config

OPTIM = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=10)


class _Planted(pl.Callback):
    """At the end of the given steps: a synchronization (on a GPU a real `.item()`; on CPU torch's warning text,
    as sync debug mode raises it), and another warning that is not one."""

    def __init__(self, steps: tuple[int, ...]) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            planted_read(pl_module)
            warnings.warn("an unrelated warning", UserWarning)


def planted_read(pl_module) -> None:
    if pl_module.device.type == "cuda":
        torch.ones(1, device=pl_module.device).sum().item()
    else:
        warnings.warn(sync_audit.SYNC_WARNING, UserWarning)


def test_the_window_records_each_synchronization_with_its_call_site_and_passes_other_warnings(tmp_path, monkeypatch):
    modes = []
    monkeypatch.setattr(sync_audit, "trains_on_cuda", lambda pl_module: True)  # the CPU stands in for the GPU here
    monkeypatch.setattr(sync_audit, "set_debug_mode", modes.append)
    audit = SyncAudit(start_step=3, num_steps=3, output=str(tmp_path / "syncs.md"))
    with pytest.warns(UserWarning, match="an unrelated warning"):  # passed on, inside the window as outside
        fit(LanguageModel(tiny_config(), OPTIM), random_batches(10), [audit, _Planted((2, 4, 5, 7))], max_steps=10)
    # Window: batch start of step 3 to batch start of step 6; the end of step 2 is before it, of step 7 after.
    assert [step for step, _ in audit.syncs] == [4, 5] and modes == ["warn", "default"]
    site = sync_audit.call_site(audit.syncs[0][1])
    assert "test_sync_audit.py" in site and "planted_read" in site and "warnings.warn(sync_audit.SYNC_WARNING" in site
    report = (tmp_path / "syncs.md").read_text()
    assert "# Host synchronizations: 3 steps from step 3" in report and "2 synchronizations (0.7 per step)" in report
    assert "| 2 | 4, 5 | `" in report and "on_train_batch_end" in report


def test_a_run_not_on_cuda_is_not_audited_and_a_warning_says_so():
    audit = SyncAudit(start_step=1, num_steps=2)
    with pytest.warns(UserWarning, match="SyncAudit: the model is not on a CUDA device"):  # a CPU run, GPU or not
        fit(LanguageModel(tiny_config(), OPTIM), random_batches(4), [audit], max_steps=4)
    assert audit.syncs == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_a_shipped_training_step_synchronizes_nowhere(tmp_path):
    audit = SyncAudit(start_step=3, num_steps=6, output=str(tmp_path / "syncs.md"))
    callbacks = [audit, PeriodicCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_steps=1000, every_minutes=30),
                 PreemptionCheckpoint(), Throughput(window=2, warmup_steps=1), SpikeDetector(action="skip_step"),
                 _Planted((6,))]  # the one expected: the audit sees a real .item()
    batches = random_batches(12)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, pin_memory=True)  # as the DataModule's batches
    trainer = pl.Trainer(accelerator="gpu", devices=1, max_steps=12, precision="bf16-mixed", gradient_clip_val=1.0,
                         log_every_n_steps=2, callbacks=callbacks, logger=CaptureLogger(), enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(LanguageModel(tiny_config(), OPTIM), loader)
    report = (tmp_path / "syncs.md").read_text()
    assert [step for step, _ in audit.syncs] == [6], report
    assert "planted_read" in sync_audit.call_site(audit.syncs[0][1]), report
