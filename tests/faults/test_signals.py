"""A plain `llmtrain fit` with the shipped quickstart config (no SLURM) that gets SIGTERM or SIGUSR1 saves last.ckpt at
the step it reached, exits 128 + signum ("saved, resumable") with one line naming the checkpoint and the resume
command, and `--ckpt_path last` resumes from that step; a run that finishes exits 0."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow

STEP_LINE = re.compile(r"^step (\d+)$")


class PrintStep(pl.Callback):
    """Prints `step N` (flushed) after every optimizer step: the test waits for a logged step, not for a time."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        print(f"step {trainer.global_step}", flush=True)


def fit_command(corpus: dict[str, Path], root: Path, steps: int, *extra: str) -> list[str]:
    """The shipped quickstart config, its callbacks list included, shrunk to a tiny model."""
    return [
        sys.executable, "-m", "llmtrain.cli", "fit", "--config", "configs/quickstart.yaml",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "1000", "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.name", "run",
        f"--trainer.callbacks+={__name__}.PrintStep",
        "--model.config.vocab_size", "320", "--model.config.d_model", "32", "--model.config.n_layer", "2",
        "--model.config.n_head", "2", "--model.config.max_seq_len", "32",
        "--model.optim.total_steps", "1000", "--model.optim.warmup_steps", "2",
        "--data.data_dir", str(corpus["shards"]), "--data.seq_len", "32", "--data.micro_batch_size", "4",
        "--data.global_batch_size", "4", "--data.num_workers", "0", *extra,
    ]


def run_until_signalled(command: list[str], signum: int, after_step: int, log: Path,
                        **env_values: str) -> tuple[int, list[int], str]:
    """Starts `command`, sends `signum` once it has printed `step after_step`; (status, steps printed, stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env_values}
    for name in [n for n in env if n.startswith("SLURM_")]:
        del env[name]
    stderr = log.open("w")  # a file, not a pipe: a full pipe would block the run while the test reads stdout
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    steps: list[int] = []
    deadline = time.monotonic() + 240
    try:
        for line in proc.stdout:
            match = STEP_LINE.match(line.strip())
            if match:
                steps.append(int(match[1]))
                if steps[-1] == after_step:
                    proc.send_signal(signum)
            assert time.monotonic() < deadline, "no step logged in time"
        status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        stderr.close()
    return status, steps, log.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_last_exits_resumable_and_resume_continues(prepared_corpus, tmp_path: Path, signum: int) -> None:
    command = fit_command(prepared_corpus, tmp_path, 1000)
    status, steps, stderr = run_until_signalled(command, signum, after_step=3, log=tmp_path / "stderr.txt")
    assert status == 128 + signum, f"exit status {status}:\n{stderr[-3000:]}"
    reached = steps[-1]
    assert 3 <= reached < 1000
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == reached
    name = signal.Signals(signum).name
    lines = [line for line in stderr.splitlines() if line.startswith("Preemption:")]
    resume = shlex.join(["llmtrain", *command[3:], "--ckpt_path", "last"])
    assert lines == [f"Preemption: {name} at step {reached}; saved {last}; resume with: {resume}; "
                     f"exit status {128 + signum} (saved, resumable)"], stderr[-3000:]

    # Resume: starts at the saved step, finishes, exits 0.
    resumed = subprocess.run(fit_command(prepared_corpus, tmp_path, reached + 2, "--ckpt_path", "last"), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(m[1]) for m in map(STEP_LINE.match, resumed.stdout.splitlines()) if m] == [reached + 1, reached + 2]
    assert torch.load(last, weights_only=True)["global_step"] == reached + 2


def test_torchrun_script_passes_the_signal_on_and_exits_with_the_processes_status(prepared_corpus, tmp_path: Path):
    command = fit_command(prepared_corpus, tmp_path, 1000)
    script = [str(REPO / "launch" / "torchrun.sh"), *command[command.index("fit") + 1:]]
    status, steps, stderr = run_until_signalled(script, signal.SIGTERM, after_step=3, log=tmp_path / "stderr.txt",
                                                PYTHON=sys.executable)
    assert status == 143, f"exit status {status}:\n{stderr[-3000:]}"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == steps[-1]
    assert f"saved {last}" in stderr and "exit status 143 (saved, resumable)" in stderr
