"""PreemptionCheckpoint in one process: a signal mid-run saves last.ckpt at a step boundary, the run exits, and a
resumed run continues the step count; when to requeue, checked against a stand-in `scontrol`."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException

from llmtrain.callbacks import PeriodicCheckpoint
from llmtrain.callbacks.preemption import PreemptionCheckpoint, _requeue_job


class SignalAt(Callback):
    """Sends `signum` to this process when batch `batch_idx` starts: that step still completes."""

    def __init__(self, batch_idx: int, signum: int) -> None:
        self.batch_idx, self.signum = batch_idx, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx and trainer.global_step == self.batch_idx:
            os.kill(os.getpid(), self.signum)


class FirstStep(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


def trainer(folder: Path, steps: int, *callbacks: Callback) -> Trainer:
    return Trainer(default_root_dir=folder, max_steps=steps, accelerator="cpu", devices=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))


@pytest.fixture(autouse=True)
def not_in_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_last_and_resume_continues_the_step_count(tmp_path, signum):
    handler_before = signal.getsignal(signum)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(SIGTERMException) as stopped:
        trainer(tmp_path, 10, ModelCheckpoint(dirpath=checkpoints, save_last=True), PreemptionCheckpoint(),
                SignalAt(3, signum)).fit(BoringModel())
    assert stopped.value.code == 128 + signum
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 4  # steps 0-3 ran
    assert signal.getsignal(signum) == handler_before

    first = FirstStep()
    resumed = trainer(tmp_path, 10, ModelCheckpoint(dirpath=checkpoints, save_last=True), PreemptionCheckpoint(),
                      first)
    resumed.fit(BoringModel(), ckpt_path="last")
    assert first.step == 4 and resumed.global_step == 10
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=10.ckpt", "last.ckpt"]


def test_with_periodic_checkpoint_links_are_kept_whole(tmp_path):
    checkpoints = tmp_path / "checkpoints"

    def periodic() -> PeriodicCheckpoint:
        return PeriodicCheckpoint(dirpath=str(checkpoints), every_n_steps=2, keep=5)

    with pytest.raises(SIGTERMException):
        trainer(tmp_path, 8, periodic(), PreemptionCheckpoint(), SignalAt(2, signal.SIGUSR1)).fit(BoringModel())
    last = checkpoints / "last.ckpt"
    # last.ckpt was a link to step 2; the preemption save replaced the link, not the file it pointed to.
    assert not last.is_symlink() and torch.load(last, weights_only=True)["global_step"] == 3
    assert torch.load(checkpoints / "step0000002.ckpt", weights_only=True)["global_step"] == 2

    trainer(tmp_path, 8, periodic(), PreemptionCheckpoint()).fit(BoringModel(), ckpt_path="last")
    assert last.is_symlink() and last.resolve().name == "step0000008.ckpt"
    assert not list(checkpoints.glob("last-v*"))


def test_needs_a_model_checkpoint(tmp_path):
    run = Trainer(default_root_dir=tmp_path, max_steps=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, callbacks=[PreemptionCheckpoint()])
    with pytest.raises(ValueError, match="add a ModelCheckpoint"):
        run.fit(BoringModel())


def test_unknown_signal_name_is_refused():
    with pytest.raises(ValueError, match=r"signals=\['SIGFOO'\]: allowed are names from"):
        PreemptionCheckpoint(signals=("SIGFOO",))


FAKE_SCONTROL = """#!/bin/sh
case "$1" in
  show) echo "JobId=$3 JobState=$FAKE_STATE Reason=$FAKE_REASON Requeue=${FAKE_REQUEUE:-1} Restarts=0" ;;
  requeue) echo "$2" >> "$FAKE_CALLS"; exit "${FAKE_REQUEUE_RC:-0}" ;;
esac
"""


@pytest.mark.parametrize("signum, state, reason, requeue_rc, expected", [
    (signal.SIGUSR1, "RUNNING", "None", 0, True),  # the warning before the time limit
    (signal.SIGTERM, "RUNNING", "None", 0, True),  # `scancel --signal=TERM`, or --signal=TERM@N
    (signal.SIGTERM, "COMPLETING", "TimeLimit", 0, True),  # SIGTERM at the time limit
    (signal.SIGTERM, "COMPLETING", "None", 0, False),  # plain `scancel`: the user wants it gone
    (signal.SIGUSR1, "RUNNING", "None", 1, False),  # scontrol refused
    (signal.SIGTERM, "COMPLETING", "TimeLimit", "no-requeue", False),  # sbatch --no-requeue (submit --no_requeue)
], ids=["usr1", "term-running", "term-timelimit", "term-cancelled", "requeue-fails", "no-requeue-job"])
def test_when_to_requeue(tmp_path, monkeypatch, signum, state, reason, requeue_rc, expected):
    if requeue_rc == "no-requeue":
        monkeypatch.setenv("FAKE_REQUEUE", "0")
        requeue_rc = 0
    (tmp_path / "scontrol").write_text(FAKE_SCONTROL)
    (tmp_path / "scontrol").chmod(0o755)
    calls = tmp_path / "calls"
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    for name, value in (("FAKE_STATE", state), ("FAKE_REASON", reason), ("FAKE_CALLS", str(calls)),
                        ("FAKE_REQUEUE_RC", str(requeue_rc))):
        monkeypatch.setenv(name, value)
    assert _requeue_job(signum) is expected
    assert calls.exists() == (expected or requeue_rc != 0)
    if calls.exists():
        assert calls.read_text() == "42\n"


def test_no_requeue_outside_slurm():
    assert _requeue_job(signal.SIGUSR1) is False


def test_submit_adds_the_callback_only_to_a_config_without_it(tmp_path):
    from llmtrain.launch import SlurmJob, render

    bare = tmp_path / "bare.yaml"  # a user's config with no callbacks list
    bare.write_text("trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.TensorBoardLogger\n")
    added = "--trainer.callbacks+=llmtrain.callbacks.preemption.PreemptionCheckpoint"
    assert render(SlurmJob(configs=[bare], workdir=tmp_path)).count(added) == 1
    shipped = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    assert added not in render(SlurmJob(configs=[shipped], workdir=tmp_path))


class SignalAtSanityCheck(Callback):
    """SIGTERM while the Trainer's own handler is installed too (after it registered, before training starts)."""

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_before_training_starts_saves_at_the_first_step_and_never_exits_0(tmp_path, capfd):
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(SIGTERMException) as stopped:
        Trainer(default_root_dir=tmp_path, max_steps=10, accelerator="cpu", devices=1, logger=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                callbacks=[ModelCheckpoint(dirpath=checkpoints, save_last=True), PreemptionCheckpoint(),
                           SignalAtSanityCheck()]).fit(BoringModel())
    assert stopped.value.code == 143  # Lightning's own SIGTERM exit carries no code: status 0
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 1
    assert "exit status 143 (saved, resumable)" in capfd.readouterr().err
