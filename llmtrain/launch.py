"""`llmtrain submit`: render launch/slurm/llmtrain.sbatch for N nodes x G GPUs from a config and flags, have SLURM
check it (`sbatch --test-only`), then submit it.

Every problem that can be found before submitting is reported before anything is submitted: bad counts or time,
a missing or invalid config (the config and overrides are parsed with `llmtrain fit --print_config`), no sbatch on
PATH, a partition or account SLURM rejects.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llmtrain.config_files import ConfigFileError, resolved_config

TEMPLATE = Path(__file__).resolve().parents[1] / "launch" / "slurm" / "llmtrain.sbatch"
PREEMPTION_CALLBACK = "llmtrain.callbacks.preemption.PreemptionCheckpoint"
# `--time` as sbatch takes it: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds.
TIME_FORMAT = re.compile(r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                         r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")
# Set by the template from the job itself; an override would contradict the allocation or the run folder.
FIT_ARGS_SET_BY_SUBMIT = {"--trainer.num_nodes": "--nodes", "--trainer.devices": "--gpus",
                          "--trainer.logger": "--name / --runs_dir"}


class SubmitError(Exception):
    """A problem with the request, reported before anything is submitted."""


@dataclass
class SlurmJob:
    """One `llmtrain fit` run as a SLURM batch job: N nodes x G tasks, one task per GPU."""

    configs: list[Path]  # applied in order, as `llmtrain fit --config A --config B` does
    nodes: int = 1
    gpus: int = 1  # per node; = tasks per node
    cpu: bool = False  # G processes per node on CPU (gloo), no GPUs requested: for CPU-only clusters and tests
    cpus_per_task: Optional[int] = None
    time: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    name: Optional[str] = None  # run name; default: the first config's file name without .yaml
    runs_dir: Path = Path("runs")
    requeue: bool = True
    signal_lead: int = 300  # seconds before the time limit at which SLURM sends SIGUSR1
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)
    sbatch_options: list[str] = field(default_factory=list)
    srun_options: list[str] = field(default_factory=list)  # e.g. a container: --container-image=...
    fit_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SubmitError(f"--{name} {value}: must be a whole number >= 1")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SubmitError(f"--cpus_per_task {self.cpus_per_task}: must be >= 1 (or left out for SLURM's default)")
        if self.signal_lead < 1:
            raise SubmitError(f"--signal_lead {self.signal_lead}: must be >= 1 second")
        if self.time is not None:
            seconds = time_limit_seconds(self.time)
            if self.requeue and seconds <= self.signal_lead:
                raise SubmitError(f"--signal_lead {self.signal_lead} s is not shorter than --time {self.time} "
                                  f"({seconds} s): the job would be told to stop as soon as it starts")
        self.workdir = self.workdir.resolve()
        self.configs = [(self.workdir / config).resolve() for config in self.configs]
        for config in self.configs:
            if not config.is_file():
                raise SubmitError(f"--config {config}: no such file; configs live in configs/ "
                                  "(e.g. --config configs/quickstart.yaml)")
        self.name = self.name or self.configs[0].stem
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise SubmitError(f"--name {self.name!r}: use letters, digits, '.', '_' and '-' (it names folders)")
        self.runs_dir = (self.workdir / self.runs_dir).resolve()
        for arg in self.fit_args:
            for taken, instead in FIT_ARGS_SET_BY_SUBMIT.items():
                if arg.split("=")[0].startswith(taken):
                    raise SubmitError(f"fit argument {arg}: submit sets {taken} itself; use {instead} instead")
        for flag, options in (("sbatch", self.sbatch_options), ("srun", self.srun_options)):
            for option in options:
                if not option.startswith("--"):
                    raise SubmitError(f"--{flag} {option!r}: give a long {flag} option, e.g. --{flag}=--exclusive")

    @property
    def log_dir(self) -> Path:
        return self.runs_dir / self.name


def time_limit_seconds(limit: str) -> int:
    match = TIME_FORMAT.match(limit)
    if match is None:
        raise SubmitError(f"--time {limit!r}: use one of SLURM's formats: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                          "D-HH:MM:SS (e.g. --time 24:00:00 or --time 2-00:00:00)")
    g = {key: int(value) if value else 0 for key, value in match.groupdict().items()}
    if match.group("days") is not None:
        seconds = ((g["days"] * 24 + g["dh"]) * 60 + g["dm"]) * 60 + g["ds"]
    elif match.group("c") is not None:  # H:M:S
        seconds = (g["a"] * 60 + g["b"]) * 60 + g["c"]
    else:  # M or M:S
        seconds = g["a"] * 60 + g["b"]
    if seconds < 1:
        raise SubmitError(f"--time {limit!r}: must be at least one minute")
    return seconds


def _config_callbacks(configs: list[Path]) -> list[str]:
    """class_path of every trainer callback the configs set, after checking the logger submit relies on."""
    trainer: dict = {}
    for config in configs:  # a later config replaces the logger and the callback list of an earlier one
        try:
            trainer.update(resolved_config(config).get("trainer") or {})
        except ConfigFileError as error:
            raise SubmitError(f"--config {config}: {error}") from None
    logger = trainer.get("logger")
    if not (isinstance(logger, dict) and "class_path" in logger):
        raise SubmitError(f"--config {' '.join(map(str, configs))}: trainer.logger must be one logger given by "
                          "class_path (e.g. lightning.pytorch.loggers.TensorBoardLogger): submit puts each job's "
                          "run in <runs_dir>/<name>/job<JOBID> through its save_dir, name and version")
    return [c.get("class_path", "") if isinstance(c, dict) else str(c) for c in trainer.get("callbacks") or []]


def config_arguments(job: SlurmJob) -> list[str]:
    return [arg for config in job.configs for arg in ("--config", str(config))]


def fit_arguments(job: SlurmJob) -> list[str]:
    """Arguments of `llmtrain fit` beyond the ones the template derives from the job (nodes, devices, run folder)."""
    args = ["--trainer.accelerator", "cpu"] if job.cpu else []
    args += job.fit_args
    if job.requeue and not any(c.endswith("PreemptionCheckpoint") for c in _config_callbacks(job.configs)):
        # Last: jsonargparse applies a following `--trainer.callbacks.N...` to the callback appended just before it.
        args.append(f"--trainer.callbacks+={PREEMPTION_CALLBACK}")
    return args


def render(job: SlurmJob, template: Path = TEMPLATE) -> str:
    """The sbatch script for this job."""
    if not template.is_file():
        raise SubmitError(f"sbatch template not found at {template}: run from a source checkout of llmtrain "
                          "(pip install -e .)")
    directives = []
    if job.time:
        directives.append(f"--time={job.time}")
    if job.partition:
        directives.append(f"--partition={job.partition}")
    if job.account:
        directives.append(f"--account={job.account}")
    if not job.cpu:
        directives.append(f"--gpus-per-node={job.gpus}")
    if job.cpus_per_task:
        directives.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.requeue:
        # Signal the tasks (not the batch shell: no "B:") ahead of the limit; PreemptionCheckpoint then saves and
        # requeues. SLURM checks every ~60 s, so the signal may come up to a minute earlier than asked.
        directives += ["--requeue", f"--signal=USR1@{job.signal_lead}"]
    else:
        directives.append("--no-requeue")
    directives += job.sbatch_options
    fit_args = " ".join(shlex.quote(arg) for arg in fit_arguments(job))
    values = {
        "nodes": str(job.nodes),
        "tasks_per_node": str(job.gpus),
        "name": job.name,
        "workdir": shlex.quote(str(job.workdir)),
        "log_dir": shlex.quote(str(job.log_dir)),
        "runs_dir": shlex.quote(str(job.runs_dir)),
        "configs": " ".join(shlex.quote(arg) for arg in config_arguments(job)),
        "python": shlex.quote(job.python),
        "srun_options": "".join(f"{shlex.quote(option)} " for option in job.srun_options),
        "directives": "\n".join(f"#SBATCH {d}" for d in directives),
        "fit_args": f"{fit_args} \\\n  " if fit_args else "",
        "rendered_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }

    def substitute(match: re.Match) -> str:
        return values[match.group(1)]

    return re.sub(r"\{\{ (\w+) \}\}", substitute, template.read_text())


def check_config(job: SlurmJob) -> None:
    """Parse the config and every override exactly as the job will (`--print_config` stops before training)."""
    command = [job.python, "-m", "llmtrain.cli", "fit", *config_arguments(job),
               "--trainer.num_nodes", str(job.nodes), "--trainer.devices", str(job.gpus),
               "--trainer.logger.init_args.save_dir", str(job.runs_dir), "--trainer.logger.init_args.name", job.name,
               "--trainer.logger.init_args.version", "job0", *fit_arguments(job), "--print_config"]
    result = subprocess.run(command, cwd=job.workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise SubmitError(f"the config does not parse with these arguments ({' '.join(command[3:-1])}):\n"
                          f"{result.stderr.strip()[-3000:]}")


def find_sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError("sbatch not found on PATH: run `llmtrain submit` on a SLURM login node (or load the "
                          "cluster's slurm module); --dry_run prints the script without SLURM, and "
                          "launch/torchrun.sh launches on machines without SLURM")
    return sbatch


def check_with_slurm(sbatch: str, script: str) -> None:
    """`sbatch --test-only`: SLURM validates partition, account, limits and node counts without submitting."""
    result = subprocess.run([sbatch, "--test-only"], input=script, capture_output=True, text=True)
    if result.returncode == 0:
        return
    message = result.stderr.strip() or result.stdout.strip()
    hint = ""
    if shutil.which("sinfo"):
        partitions = subprocess.run(["sinfo", "-h", "-o", "%P %D %l %G"], capture_output=True, text=True).stdout
        if partitions.strip():
            hint = ("\npartitions here (name, nodes, time limit, GRES):\n  "
                    + "\n  ".join(partitions.strip().splitlines()))
    raise SubmitError(f"SLURM rejects this job (sbatch --test-only, nothing was submitted): {message}\n"
                      "check --partition, --account, --time, --nodes and --gpus against what the cluster offers"
                      + hint)


def submit(sbatch: str, job: SlurmJob, script: str) -> str:
    """Submit the script; returns the job id. A copy of the script is kept beside the job's log."""
    job.log_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the folder of --output
    result = subprocess.run([sbatch, "--parsable"], input=script, capture_output=True, text=True)
    if result.returncode != 0:
        raise SubmitError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";")[0]
    (job.log_dir / f"slurm-{job_id}.sbatch").write_text(script)
    return job_id


def parse_args(argv: list[str]) -> tuple[SlurmJob, bool]:
    """The job, and whether this is a dry run."""
    own, fit_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="llmtrain submit",
        description="Render launch/slurm/llmtrain.sbatch for N nodes x G GPUs and submit it with sbatch. "
                    "Arguments after `--` go to `llmtrain fit` (e.g. -- --model.config.n_layer 8).",
        allow_abbrev=False)
    parser.add_argument("--config", dest="configs", required=True, type=Path, action="append",
                        help="the run's YAML, e.g. configs/llama-124m.yaml; repeatable, applied in order "
                             "(--config configs/llama-124m.yaml --config configs/deepspeed/zero2.yaml)")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node = tasks per node (default 1)")
    parser.add_argument("--cpu", action="store_true",
                        help="run --gpus processes per node on CPU (gloo) and request no GPUs")
    parser.add_argument("--cpus_per_task", type=int, help="CPU cores per task (default: the partition's)")
    parser.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00 (default: the partition's)")
    parser.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    parser.add_argument("--account", help="SLURM account to charge")
    parser.add_argument("--name", help="run name (default: the config's file name); the job's log goes to "
                                       "<runs_dir>/<name>/slurm-<JOBID>.out, its run to <runs_dir>/<name>/job<JOBID>")
    parser.add_argument("--runs_dir", type=Path, default=Path("runs"), help="default: runs")
    parser.add_argument("--no_requeue", dest="requeue", action="store_false",
                        help="no signal before the time limit, no checkpoint-and-requeue")
    parser.add_argument("--signal_lead", type=int, default=300,
                        help="seconds before the time limit to save and requeue (default 300)")
    parser.add_argument("--sbatch", dest="sbatch_options", action="append", default=[], metavar="OPTION",
                        help="an extra sbatch option, repeatable: --sbatch=--qos=high --sbatch=--exclusive")
    parser.add_argument("--srun", dest="srun_options", action="append", default=[], metavar="OPTION",
                        help="an extra srun option, repeatable, e.g. a container with pyxis: "
                             "--srun=--container-image=IMAGE --python python")
    parser.add_argument("--python", default=sys.executable,
                        help=f"the Python that runs llmtrain on the nodes (default: {sys.executable})")
    parser.add_argument("--dry_run", "--dry-run", action="store_true",
                        help="print the script and submit nothing (no SLURM needed)")
    args = parser.parse_args(own)
    options = vars(args)
    dry_run = options.pop("dry_run")
    return SlurmJob(**options, fit_args=fit_args), dry_run


def submit_main(argv: list[str]) -> int:
    try:
        job, dry_run = parse_args(argv)
        script = render(job)
        if dry_run:
            check_config(job)
            print(script, end="")
            return 0
        sbatch = find_sbatch()
        check_with_slurm(sbatch, script)  # the quick checks first: check_config starts Python with torch
        check_config(job)
        job_id = submit(sbatch, job, script)
    except SubmitError as error:
        print(f"llmtrain submit: error: {error}", file=sys.stderr)
        return 2
    print(f"Submitted job {job_id}: {job.nodes} node(s) x {job.gpus} {'process(es)' if job.cpu else 'GPU(s)'}\n"
          f"  log:        {job.log_dir}/slurm-{job_id}.out\n"
          f"  run folder: {job.log_dir}/job{job_id} (TensorBoard events, config.yaml, checkpoints/)\n"
          f"  script:     {job.log_dir}/slurm-{job_id}.sbatch")
    return 0


if __name__ == "__main__":
    sys.exit(submit_main(sys.argv[1:]))
