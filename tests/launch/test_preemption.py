"""PreemptionCheckpoint: a signal mid-run saves last.ckpt at a step boundary, the run exits, and a resumed run
continues the step count; across two ranks, a signal to one stops both at the same step, and no step boundary reads
a collective on the host; when to requeue, checked against a stand-in `scontrol`."""

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
    """SIGTERM as the sanity check starts, after the Trainer registered its own handler."""

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


class SignalAtValidation(Callback):
    """SIGTERM during the sanity check's first batch, where Lightning's evaluation loop would stop on it."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("signaller", [SignalAtSanityCheck, SignalAtValidation], ids=["at-its-start", "during-it"])
def test_sigterm_in_the_sanity_check_saves_at_the_first_step_and_never_exits_0(tmp_path, capfd, signaller):
    """With Lightning's notifier still installed there (the sanity check may compile for minutes), its evaluation
    loop stopped the run with SystemExit(None): status 0, nothing saved."""
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(SIGTERMException) as stopped:
        Trainer(default_root_dir=tmp_path, max_steps=10, accelerator="cpu", devices=1, logger=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=2,
                callbacks=[ModelCheckpoint(dirpath=checkpoints, save_last=True), PreemptionCheckpoint(),
                           signaller()]).fit(BoringModel())
    assert stopped.value.code == 143
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 1
    assert "exit status 143 (saved, resumable)" in capfd.readouterr().err


def test_a_stop_without_a_status_after_a_signal_gets_128_plus_the_signal():
    """Lightning's own loops stop on its SIGTERM flag with SystemExit(None) (status 0); a signal that reached it before
    the callback took over still exits 143, saved or not."""
    callback = PreemptionCheckpoint()
    try:
        callback._record(signal.SIGTERM, None)
        stop = SIGTERMException()
        callback.on_exception(None, None, stop)
        assert stop.code == 143
    finally:
        callback._restore()


# Two gloo ranks (launched as torchrun would): rank 0's clock makes the time trigger due after step 3 and SIGUSR1
# reaches rank 1 alone at step 6. Every rank must save the same steps and stop at the same one; at no step boundary
# outside a save may a rank read a collective's result on the host or enter a barrier (with NCCL, either drains the
# GPU's queue): SpikeDetector's mean loss over the ranks is one such collective at every step.
TWO_RANKS = r"""
import os, signal, sys
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException
from llmtrain.callbacks import PeriodicCheckpoint, SpikeDetector
from llmtrain.callbacks.preemption import PreemptionCheckpoint

rank = int(os.environ["RANK"])

class Steps(Callback):
    # The steps saved, and the step of every collective read on the host (Lightning's and ours).
    def __init__(self, periodic):
        self.periodic, self.saved, self.reads, self.training = periodic, [], [], False
    def setup(self, trainer, pl_module, stage):
        for owner, name in ((trainer.strategy, "reduce_boolean_decision"), (trainer.strategy, "broadcast"),
                            (torch.distributed, "broadcast"), (torch.distributed, "barrier")):
            self._spy(trainer, owner, name)
    def _spy(self, trainer, owner, name):
        original = getattr(owner, name)
        def spied(*args, **kwargs):
            if self.training:
                self.reads.append(trainer.global_step)
            return original(*args, **kwargs)
        setattr(owner, name, spied)
    def on_train_start(self, trainer, pl_module):
        self.training = True
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if rank == 0 and trainer.global_step == 3:
            self.periodic._since_save -= 3600  # rank 0's clock only: the trigger is due at the end of this step
        if rank == 1 and trainer.global_step == 6:
            os.kill(os.getpid(), signal.SIGUSR1)
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saved.append(trainer.global_step)

periodic = PeriodicCheckpoint(dirpath=sys.argv[1], every_n_steps=None, every_minutes=30, keep=10)
steps = Steps(periodic)
trainer = Trainer(max_steps=20, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  callbacks=[periodic, PreemptionCheckpoint(requeue=False), SpikeDetector(), steps])
try:
    trainer.fit(BoringModel())
    status = 0
except SIGTERMException as stop:
    status = stop.code
print(f"RESULT rank={rank} status={status} saved={steps.saved} reads={sorted(set(steps.reads))}", flush=True)
"""


@pytest.mark.slow
def test_across_ranks_a_signal_to_one_stops_all_at_one_step_without_host_reads(tmp_path):
    from tests.conftest import run_deepspeed_ranks

    outputs = run_deepspeed_ranks(TWO_RANKS, [str(tmp_path)], world_size=2)
    results = [next(line for line in out.splitlines() if line.startswith("RESULT")) for out in outputs]
    # Each decision acts one step after the step it was raised at: due at the end of step 4 -> saved at step 5;
    # signalled during step 7 -> saved at step 8, and the run stops before step 9 (SIGUSR1's 138 on the rank that
    # got it, SIGTERM's 143 on the other). Collectives are read on the host in the saves' barriers only, not at
    # every step boundary.
    for rank, (status, result) in enumerate(zip((143, 138), results)):
        assert result == f"RESULT rank={rank} status={status} saved=[5, 8] reads=[5, 8]", "\n".join(outputs)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 8
