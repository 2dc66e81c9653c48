"""A loss or gradient that goes NaN never reaches the weights or a checkpoint, whatever SpikeDetector's action; a run
that stays non-finite stops with a clear error, and the newest finite checkpoint is kept."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from llmtrain.callbacks import PeriodicCheckpoint, SpikeDetector, TrainingDiverged
from llmtrain.checkpointing.save import NonFiniteWeights
from llmtrain.training.optim import OptimConfig
from tests.callbacks import SpikeModel, fit, random_batches, tiny_config
from tests.conftest import REPO

OPTIM = OptimConfig(lr=3e-3, warmup_steps=1, total_steps=40)


def checkpoint_tensors(folder: Path) -> dict[str, list[torch.Tensor]]:
    """Every floating tensor (weights and optimizer state) of every checkpoint file in `folder`, by file name."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            return [value] if value.is_floating_point() else []
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
        return [t for item in items for t in tensors(item)]

    return {path.name: tensors({k: v for k, v in torch.load(path, weights_only=True).items()
                                if k in ("state_dict", "optimizer_states")})
            for path in sorted(folder.glob("*.ckpt"))}


@pytest.mark.parametrize("action", ["log", "skip_step", "rollback"])
def test_a_run_that_stays_nan_stops_and_every_checkpoint_is_finite(tmp_path: Path, action: str) -> None:
    torch.manual_seed(0)
    model = SpikeModel(tiny_config(), OPTIM, plant={call: math.nan for call in range(6, 200)})
    detector = SpikeDetector(action=action, warmup_steps=3, max_nonfinite_steps=3)
    checkpoints = PeriodicCheckpoint(dirpath=str(tmp_path), every_n_steps=2, keep=1)
    with pytest.raises(TrainingDiverged, match="non-finite loss or gradient norm|rollbacks"):
        fit(model, random_batches(8), [detector, checkpoints], max_steps=40)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = checkpoint_tensors(tmp_path)
    assert saved and "last.ckpt" in saved
    for name, tensors in saved.items():
        assert all(torch.isfinite(t).all() for t in tensors), f"{name} holds NaN/inf"


def test_one_nan_step_under_log_is_skipped_and_the_run_goes_on(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SpikeModel(tiny_config(), OPTIM, plant={6: math.nan})
    detector = SpikeDetector(action="log", warmup_steps=3)
    trainer, _ = fit(model, random_batches(8), [detector], max_steps=10)
    assert trainer.global_step == 10
    assert [(e["step"], e["response"]) for e in detector.events] == [(6, "skip_step")]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_without_a_detector_a_nan_model_is_never_saved_and_the_good_checkpoint_stays(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SpikeModel(tiny_config(), OPTIM, plant={call: math.nan for call in range(3, 200)})
    checkpoints = PeriodicCheckpoint(dirpath=str(tmp_path), every_n_steps=2, keep=1)
    with pytest.raises(NonFiniteWeights, match="not saving a checkpoint at step 4: the weights hold NaN/inf"):
        fit(model, random_batches(8), [checkpoints], max_steps=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step0000002.ckpt"]
    assert (tmp_path / "last.ckpt").resolve().name == "step0000002.ckpt"
    assert all(torch.isfinite(t).all() for tensors in checkpoint_tensors(tmp_path).values() for t in tensors)


class NaNFromStep(pl.Callback):
    """From optimizer step `step` on, the token embeddings' output is NaN, so every later loss and gradient is."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.hook = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step and self.hook is None:
            self.hook = pl_module.model.tok_embeddings.register_forward_hook(lambda m, args, out: out * math.nan)


@pytest.mark.slow
def test_llmtrain_fit_that_goes_nan_exits_nonzero_and_keeps_finite_checkpoints(prepared_corpus, tmp_path: Path) -> None:
    # The detector as the class default has it (action log), as in the ablation suite's base config.
    callbacks = [{"class_path": "llmtrain.callbacks.PeriodicCheckpoint", "init_args": {"every_n_steps": 2, "keep": 1}},
                 {"class_path": "llmtrain.callbacks.SpikeDetector", "init_args": {"warmup_steps": 2}},
                 {"class_path": f"{__name__}.NaNFromStep", "init_args": {"step": 5}}]
    result = subprocess.run([
        sys.executable, "-m", "llmtrain.cli", "fit", "--config", "configs/quickstart.yaml",
        "--trainer.max_steps", "40", "--trainer.val_check_interval", "1000", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", json.dumps(callbacks),
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.name", "run",
        "--model.config.vocab_size", "320", "--model.config.d_model", "32", "--model.config.n_layer", "2",
        "--model.config.n_head", "2", "--model.config.max_seq_len", "32", "--model.optim.total_steps", "40",
        "--model.optim.warmup_steps", "2", "--data.data_dir", str(prepared_corpus["shards"]), "--data.seq_len", "32",
        "--data.micro_batch_size", "4", "--data.global_batch_size", "4", "--data.num_workers", "0",
    ], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stderr[-3000:]
    assert re.search(r"SpikeDetector: 4 steps in a row with a non-finite loss or gradient norm "
                     r"\(max_nonfinite_steps=3\), the last at step 8: loss=nan", result.stderr), result.stderr[-3000:]
    assert "--ckpt_path last" in result.stderr
    folder = tmp_path / "run" / "checkpoints"
    saved = checkpoint_tensors(folder)
    assert "last.ckpt" in saved and torch.load(folder / "last.ckpt", weights_only=True)["global_step"] >= 4
    for name, tensors in saved.items():
        assert all(torch.isfinite(t).all() for t in tensors), f"{name} holds NaN/inf"
