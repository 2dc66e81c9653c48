"""`llmtrain submit` against a real SLURM on this machine: DDP over 2 tasks, over 2 nodes, and a requeue that resumes.

The cluster (tests/launch/conftest.py) needs Debian's slurm-wlm and munge installed (skipped otherwise), and runs
two slurmd "nodes" on localhost. The jobs train the quickstart model, shrunk, with gloo on CPU.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llmtrain.events import read_scalars
from tests.launch.conftest import REPO, SlurmCluster, tiny_config

pytestmark = pytest.mark.slurm

MICRO_BATCH, SEQ_LEN = 4, 32  # as in tiny_config


def submit(cluster: SlurmCluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtrain.cli", "submit", *args], env=cluster.env, cwd=REPO,
                          capture_output=True, text=True, timeout=180)


def submit_job(cluster: SlurmCluster, runs: Path, config: Path, nodes: int, tasks: int) -> str:
    result = submit(cluster, "--config", str(config), "--nodes", str(nodes), "--gpus", str(tasks), "--cpu",
                    "--runs_dir", str(runs), "--name", "t")
    assert result.returncode == 0, result.stderr
    return re.search(r"Submitted job (\d+)", result.stdout).group(1)


def finished(cluster: SlurmCluster, runs: Path, job_id: str, timeout: float = 150) -> tuple[dict[str, str], str]:
    info = cluster.wait_for_job(job_id, timeout=timeout)
    log = (runs / "t" / f"slurm-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", f"{info['JobState']} {info['ExitCode']}\n{log[-6000:]}"
    return info, log


def global_step(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.parametrize("nodes, tasks_per_node", [(1, 2), (2, 1)], ids=["1node-x2", "2nodes-x1"])
def test_submitted_job_trains_with_ddp_over_two_processes(slurm_cluster, prepared_corpus, tmp_path, nodes,
                                                          tasks_per_node):
    steps = 10  # a multiple of every_n_steps (5): the last periodic save is the final step
    runs = tmp_path / "runs"
    job_id = submit_job(slurm_cluster, runs, tiny_config(tmp_path, prepared_corpus["shards"], steps), nodes,
                        tasks_per_node)
    info, log = finished(slurm_cluster, runs, job_id)

    assert info["NumNodes"] == str(nodes) and info["NumTasks"] == "2"
    assert "distributed_backend=gloo" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    run = runs / "t" / f"job{job_id}"  # the job's own run folder
    assert global_step(run / "checkpoints" / "last.ckpt") == steps
    # Both processes consumed their own part of the data: the logged global token count is 2 ranks' worth.
    assert read_scalars(run)["train/tokens"][steps - 1] == steps * 2 * MICRO_BATCH * SEQ_LEN
    assert (runs / "t" / f"slurm-{job_id}.sbatch").is_file()


def test_requeued_job_resumes_from_its_checkpoint(slurm_cluster, prepared_corpus, tmp_path):
    steps = 300  # long enough to be signalled mid-run (10-50 ms per step)
    runs = tmp_path / "runs"
    job_id = submit_job(slurm_cluster, runs, tiny_config(tmp_path, prepared_corpus["shards"], steps), 1, 2)
    checkpoints = runs / "t" / f"job{job_id}" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step*.ckpt")):  # training is under way
        assert time.monotonic() < deadline, slurm_cluster.job(job_id)
        time.sleep(0.2)
    # What `sbatch --signal=USR1@N` does before the time limit, without waiting for one.
    slurm_cluster.run("scancel", "--signal=USR1", job_id)
    info, log = finished(slurm_cluster, runs, job_id, timeout=180)

    assert info["Restarts"] == "1", log[-6000:]
    preempted = re.search(r"Preemption: SIGUSR1 at step (\d+); saved (\S+); job requeued", log)
    assert preempted, log[-6000:]
    stop_step, saved = int(preempted.group(1)), preempted.group(2)
    assert 0 < stop_step < steps and saved == str(checkpoints / "last.ckpt")
    assert "(restart 1)" in log
    assert f"Restored all states from the checkpoint at {saved}" in log  # no user action: the job found it
    assert global_step(checkpoints / "last.ckpt") == steps
    # The second run continued the step count: its TensorBoard file starts where the first one stopped.
    first, second = sorted(checkpoints.parent.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    logged = []
    for events in (first, second):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        logged.append([event.step for event in accumulator.Scalars("train/loss")])
    assert logged[0][0] == 0 and logged[0][-1] == stop_step - 1
    assert logged[1][0] == stop_step and logged[1][-1] == steps - 1


def test_partition_slurm_rejects_is_reported_before_submitting(slurm_cluster, prepared_corpus, tmp_path):
    jobs_before = slurm_cluster.run("scontrol", "show", "job", "-o").stdout.count("JobId=")
    result = submit(slurm_cluster, "--config", str(tiny_config(tmp_path, prepared_corpus["shards"], 4)),
                    "--gpus", "2", "--cpu", "--partition", "nosuch", "--runs_dir", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert "SLURM rejects this job" in result.stderr and "nothing was submitted" in result.stderr
    assert "invalid partition" in result.stderr.lower()
    assert "debug" in result.stderr  # the partitions that do exist
    assert slurm_cluster.run("scontrol", "show", "job", "-o").stdout.count("JobId=") == jobs_before
