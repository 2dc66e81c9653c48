"""Preemption: on SIGTERM or SIGUSR1 (SLURM's warning signal), save `last.ckpt` at a step boundary, requeue the job
when in SLURM, and exit with 128 + the signal number: 143 (SIGTERM) and 138 (SIGUSR1) mean "saved, resumable".

Why not Lightning's own `SLURMEnvironment(auto_requeue=True)`: in Lightning 2.6 it saves the checkpoint *inside the
signal handler*, i.e. after any bytecode, possibly mid-step or mid-collective (Lightning-AI/pytorch-lightning#21406:
intermittent hangs), and writes `hpc_ckpt_N.ckpt` beside, not into, the folder that `--ckpt_path last` reads; its
SIGTERM handler also runs a collective inside the handler. Here the handler only records the signal. At each optimizer
step's end every rank submits whether it has a signal to a StepAgreement (an all-reduce read one step later, so the
GPU's queue never drains for it); the step where the agreement says yes, all ranks save `last.ckpt` together: the
step the signal came in on one process, the step after it across processes. At the start of the following batch
rank 0 runs `scontrol requeue` (in SLURM), prints one line naming the checkpoint and the resume command, and every
rank exits with 128 + signum. The requeued job (SLURM_RESTART_COUNT > 0) is started by
launch/slurm/llmtrain.sbatch with `--ckpt_path last`, which finds this checkpoint; outside SLURM the user (or a
supervisor reading the status) reruns the printed command. The shipped configs list this callback, so a plain
`llmtrain fit` stopped by `kill`, a scheduler or a container runtime keeps its steps and never exits 0.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from llmtrain.compat import restore_sigterm_broadcast, set_handlers_restored_after_fit, take_over_sigterm
from llmtrain.training.agreement import StepAgreement

SIGNALS = {"SIGUSR1": signal.SIGUSR1, "SIGUSR2": signal.SIGUSR2, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


class PreemptionCheckpoint(Callback):
    """Saves `<ModelCheckpoint dirpath>/last.ckpt` when one of `signals` arrives, requeues the SLURM job, and exits.

    Args:
        signals: names of the signals that mean "stop soon" (keys of SIGNALS). SLURM sends the one chosen by
            `sbatch --signal=USR1@SECONDS` before the time limit, and SIGTERM at the limit, on `scancel`, and on
            preemption.
        requeue: run `scontrol requeue $SLURM_JOB_ID` after saving (only inside a SLURM job). On SIGTERM the job is
            requeued only while it is still running or was stopped by its time limit: a job that `scancel`
            cancelled keeps its checkpoint but stays cancelled.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), requeue: bool = True) -> None:
        unknown = [name for name in signals if name not in SIGNALS]
        if unknown or not signals:
            raise ValueError(f"PreemptionCheckpoint.signals={list(signals)!r}: allowed are names from "
                             f"{sorted(SIGNALS)} (at least one)")
        self.signals = tuple(signals)
        self.requeue = requeue
        self._received: Optional[int] = None  # the last signal number seen by this process
        self._original_handlers: dict[int, Any] = {}
        self._last_global_step = -1
        self._saved: Optional[Path] = None  # the checkpoint written after a signal; the run stops at the next batch
        self._agreement = StepAgreement()

    # -- signal handling: the handler only records; all work happens at a step boundary -----------------------------

    def _record(self, signum: int, _frame: Optional[FrameType]) -> None:
        self._received = signum

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionCheckpoint must be set up in the main thread (signal handlers live there)")
        for name in self.signals:
            signum = SIGNALS[name]
            self._original_handlers.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._record)

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._original_handlers.items():
                signal.signal(signum, handler)
        self._original_handlers = {}

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(trainer.checkpoint_callback, ModelCheckpoint):
            raise ValueError("PreemptionCheckpoint saves into ModelCheckpoint's folder as last.ckpt, where "
                             "`--ckpt_path last` finds it on restart: add a ModelCheckpoint to trainer.callbacks")
        # Installed before the Trainer registers its own handlers, so that Lightning, seeing a SIGUSR1 handler,
        # does not add its in-handler auto-requeue.
        self._received, self._saved = None, None
        self._install()

    def on_sanity_check_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._take_over_signals(trainer)  # the sanity check may compile for minutes: no Lightning handler meanwhile

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._take_over_signals(trainer)
        self._last_global_step = trainer.global_step
        self._agreement.reset()

    def _take_over_signals(self, trainer: "pl.Trainer") -> None:
        # The Trainer registers its own SIGTERM notifier right before the sanity check (and training), wrapping ours;
        # it runs a collective inside the handler, on whichever rank got the signal: ours replaces it. On every way
        # out, exceptions included, the Trainer's teardown (the last thing to run) re-installs the handlers it found
        # when it registered, i.e. ours: make those the originals instead.
        for name in self.signals:
            signal.signal(SIGNALS[name], self._record)
        set_handlers_restored_after_fit(trainer, self._original_handlers)
        if "SIGTERM" in self.signals:
            take_over_sigterm(trainer)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._restore()
            restore_sigterm_broadcast(trainer)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # A SIGTERM before on_train_start also reached the Trainer's own handler, and Lightning's loops stop on it with
        # SystemExit(None), i.e. status 0 (e.g. its evaluation loop in the sanity check): give it ours, never 0.
        if isinstance(exception, SIGTERMException) and exception.code is None and self._received is not None:
            exception.code = self._announce(trainer) if self._saved is not None else 128 + self._received
        self._restore()  # for an exception before training started, when the Trainer has nothing to put back

    # -- at the step boundary -------------------------------------------------------------------------------------

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_global_step:
            return  # inside gradient accumulation: the accumulated gradients are not part of a checkpoint
        self._last_global_step = trainer.global_step
        # Every rank stops at the same step, even if only one was signalled; a call on every rank at every step.
        agreed = self._agreement.submit(trainer, self._received is not None)
        if agreed and self._saved is None:
            self._saved = self._save(trainer)  # where ModelCheckpoint saves too: a state Lightning resumes exactly

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        # Stop here rather than right after saving, so that the saved step's metrics have been logged.
        if self._saved is None:
            return
        status = self._announce(trainer)
        trainer.strategy.barrier("PreemptionCheckpoint.exit")
        # The SystemExit that Lightning's loops raise on SIGTERM: loggers are finalised, callbacks see it, and the
        # status reaches the shell through llmtrain.cli.main (138 for SIGUSR1: the sbatch template requeues on it).
        raise SIGTERMException(status)

    def _announce(self, trainer: "pl.Trainer") -> int:
        """Requeues the SLURM job (rank 0), prints the one line saying what was saved and how to go on; returns the
        exit status, 128 + the signal number (a rank told by another rank's signal exits as for SIGTERM)."""
        signum = self._received
        status = 128 + (signum or signal.SIGTERM)
        requeued = trainer.is_global_zero and self.requeue and _requeue_job(signum)
        name = signal.Signals(signum).name if signum is not None else "a signal on another rank"
        then = "job requeued, it resumes from there" if requeued else f"resume with: {_resume_command()}"
        _print_line(f"Preemption: {name} at step {trainer.global_step}; saved {self._saved}; {then}; "
                    f"exit status {status} (saved, resumable)")
        return status

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._saved is not None:
            rank_zero_info(f"Preemption: the run reached its last step right after saving {self._saved}; not requeued")

    def _save(self, trainer: "pl.Trainer") -> Path:
        checkpoint = trainer.checkpoint_callback
        assert isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath is not None
        path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        # Point every save_last ModelCheckpoint of this folder at this file (it is part of their saved state), so
        # that after the restart they overwrite it instead of starting last-v1.ckpt beside it.
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath == checkpoint.dirpath:
                callback.last_model_path = str(path)
        # All ranks (with DeepSpeed each writes its shard). Both of our checkpoint IOs write atomically (Lightning's
        # through a temp file and rename, ZeroStrategy through a staging folder), so a SIGKILL at the end of SLURM's
        # grace period cannot leave a truncated last.ckpt; the rename replaces a `last` link, not its target.
        trainer.save_checkpoint(path)
        return path


@rank_zero_only
def _print_line(line: str) -> None:
    # stderr, unbuffered and whatever the logging setup: the line a user or a supervisor script looks for.
    print(line, file=sys.stderr, flush=True)


def _resume_command() -> str:
    """The command line of this run with `--ckpt_path last` in place of any --ckpt_path, when it was a plain
    `llmtrain fit` (the console script or `python -m llmtrain.cli`); else the advice for the launcher."""
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:  # under torchrun: rerun the launcher, not one process
        return "the same launch (launch/torchrun.sh or torchrun) with --ckpt_path last added"
    if Path(sys.argv[0]).name not in ("llmtrain", "cli.py") or sys.argv[1:2] != ["fit"]:
        return "the same fit with ckpt_path='last' (`llmtrain fit ... --ckpt_path last`)"
    kept: list[str] = []
    args = iter(sys.argv[1:])
    for arg in args:
        if arg == "--ckpt_path":
            next(args, None)  # and its value
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["llmtrain", *kept, "--ckpt_path", "last"])


def _requeue_job(signum: Optional[int]) -> bool:
    """`scontrol requeue` this job; False (with the reason logged) when not in SLURM, not requeueable (sbatch
    --no-requeue, `llmtrain submit --no_requeue`), cancelled, or it fails."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if job_id is None:
        return False
    state = _job_fields(job_id)
    if state.get("Requeue") == "0":
        rank_zero_info(f"Preemption: job {job_id} was submitted with --no-requeue: not requeued")
        return False
    if signum == signal.SIGTERM:
        # scancel: JobState=COMPLETING, Reason=None; time limit: Reason=TimeLimit; `scancel --signal=TERM`: RUNNING.
        if state.get("JobState") != "RUNNING" and state.get("Reason") != "TimeLimit":
            rank_zero_info(f"Preemption: job {job_id} is being cancelled ({state or 'state unknown'}): not requeued")
            return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired) as error:
        rank_zero_warn(f"Preemption: could not run `scontrol requeue {job_id}` ({error}); resubmit the job with "
                       "`--ckpt_path last` to resume")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"Preemption: `scontrol requeue {job_id}` failed ({result.returncode}): "
                       f"{result.stderr.strip()}; resubmit the job with `--ckpt_path last` to resume")
        return False
    return True


def _job_fields(job_id: str) -> dict[str, str]:
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             timeout=30).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    return dict(item.split("=", 1) for item in out.split() if item.startswith(("JobState=", "Reason=", "Requeue=")))
