"""`llmtrain submit` without SLURM: the rendered script, and bad input refused before anything runs."""

from __future__ import annotations

import os
import subprocess

import pytest

from llmtrain import launch
from llmtrain.launch import SlurmJob, SubmitError, render, submit_main, time_limit_seconds
from tests.launch.conftest import REPO

QUICKSTART = REPO / "configs" / "quickstart.yaml"
ZERO2 = REPO / "configs" / "deepspeed" / "zero2.yaml"


def test_render_two_nodes_of_eight_gpus():
    job = SlurmJob(configs=[QUICKSTART, ZERO2], nodes=2, gpus=8, time="24:00:00", partition="gpu", account="proj",
                   cpus_per_task=12, workdir=REPO, sbatch_options=["--qos=high"],
                   fit_args=["--model.config.n_layer", "8"])
    script = render(job)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=24:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --requeue", "#SBATCH --signal=USR1@300",
                 "#SBATCH --open-mode=append", "#SBATCH --qos=high", f"#SBATCH --chdir={REPO}",
                 f"#SBATCH --output={REPO}/runs/quickstart/slurm-%j.out"):
        assert line in script.splitlines(), line
    assert f"--config {QUICKSTART} --config {ZERO2}" in script
    assert '--trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE"' in script
    assert '--trainer.logger.init_args.version "job$SLURM_JOB_ID"' in script
    # Overrides pass through; quickstart.yaml lists PreemptionCheckpoint already, so submit does not add a second.
    assert "--model.config.n_layer 8" in script and "callbacks+=" not in script
    assert "--trainer.accelerator cpu" not in script
    assert "{{" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_render_cpu_without_requeue_requests_no_gpus_and_no_signal():
    script = render(SlurmJob(configs=[QUICKSTART], gpus=2, cpu=True, requeue=False, workdir=REPO))
    assert "--gpus-per-node" not in script and "--signal" not in script and "#SBATCH --no-requeue" in script
    assert "--trainer.accelerator cpu" in script and "callbacks+=" not in script


def test_dry_run_prints_the_script_without_slurm(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    monkeypatch.chdir(REPO)
    assert submit_main(["--config", "configs/quickstart.yaml", "--nodes", "4", "--gpus", "8", "--dry-run",
                        "--", "--model.config.n_layer", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "#SBATCH --nodes=4" in out and "--model.config.n_layer 8" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes 0: must be a whole number >= 1"),
    (["--gpus", "-2"], "--gpus -2: must be a whole number >= 1"),
    (["--config", "configs/nosuch.yaml"], "configs/nosuch.yaml: no such file"),
    (["--time", "1 day"], "--time '1 day': use one of SLURM's formats"),
    (["--time", "4:00", "--signal_lead", "600"], "not shorter than --time"),
    (["--", "--trainer.devices", "4"], "submit sets --trainer.devices itself; use --gpus"),
    (["--name", "a/b"], "--name 'a/b'"),
])
def test_bad_input_is_refused_before_anything_runs(monkeypatch, capsys, args, message):
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"ran {args} despite bad input")

    monkeypatch.setattr(launch.subprocess, "run", no_subprocess)
    monkeypatch.chdir(REPO)
    config = [] if "--config" in args else ["--config", "configs/quickstart.yaml"]
    assert submit_main([*config, *args]) == 2
    assert message in capsys.readouterr().err


def test_no_sbatch_on_path_says_what_to_do(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: pytest.fail("nothing may run without sbatch"))
    assert submit_main(["--config", "configs/quickstart.yaml"]) == 2
    err = capsys.readouterr().err
    assert "sbatch not found on PATH" in err and "--dry_run" in err and "torchrun.sh" in err


def test_config_that_does_not_parse_is_reported_before_submitting(monkeypatch, capsys, tmp_path):
    fake_sbatch = tmp_path / "sbatch"
    fake_sbatch.write_text('#!/bin/sh\n[ "$1" = --test-only ] && exit 0\necho submitted >> "$0.calls"\n')
    fake_sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.chdir(REPO)
    assert submit_main(["--config", "configs/quickstart.yaml", "--", "--model.config.n_layrs", "8"]) == 2
    assert "the config does not parse" in capsys.readouterr().err
    assert not (tmp_path / "sbatch.calls").exists()


def test_config_without_a_logger_class_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  max_steps: 3\n")
    with pytest.raises(SubmitError, match="trainer.logger must be one logger given by class_path"):
        render(SlurmJob(configs=[config], workdir=tmp_path))


@pytest.mark.parametrize("limit, seconds", [("90", 5400), ("90:30", 5430), ("2:00:00", 7200), ("1-0", 86400),
                                            ("1-02:03", 93780), ("1-02:03:04", 93784)])
def test_time_limit_formats(limit, seconds):
    assert time_limit_seconds(limit) == seconds
