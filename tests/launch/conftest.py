"""A real SLURM on this machine: Debian's slurm-wlm + munge, two slurmd "nodes", all state under a temp folder.

Measured facts this follows: the daemons run as root and started by hand (no systemd, no
cgroups); SLURM_CONF points every client and job at our slurm.conf, so nothing is written under /etc; two slurmd
processes with distinct ports are two nodes; `cred_expire` and `sched_interval` bring a requeued job back in
~12-30 s instead of ~2 minutes.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo")
NODES = ("n1", "n2")
PARTITION = "debug"


@dataclass
class SlurmCluster:
    """Handle on the running test cluster: its config file, the environment clients need, and helpers."""

    root: Path
    conf: Path
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *command: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n"
                                 f"{self.daemon_logs()}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once SLURM forgot the job."""
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if result.returncode != 0:
            return {}
        return dict(item.split("=", 1) for item in result.stdout.split() if "=" in item)

    def wait_for_job(self, job_id: str, until: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                 "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"),
                     timeout: float = 120) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} did not reach {until} in {timeout:.0f} s: {self.job(job_id)}\n"
                             f"{self.daemon_logs()}")

    def daemon_logs(self, tail: int = 2000) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def queued(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()

    def stop(self) -> None:
        # scancel first; a job that saves and requeues itself on SIGTERM gets SIGKILL on the second round.
        for signal_option in ((), ("--signal=KILL", "--full")):
            if not self.queued():
                break
            self.run("scancel", *signal_option, *self.queued(), check=False)
            self.run("scancel", *self.queued(), check=False)
            deadline = time.monotonic() + 20
            while self.queued() and time.monotonic() < deadline:
                time.sleep(0.5)
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _missing_packages() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
            is None]


def slurm_unavailable() -> Optional[str]:
    """Why the real-SLURM tests cannot run here, or None. Nothing is installed: a test run must not change the
    system unasked (.ci/run installs the packages explicitly before it runs the tests)."""
    missing = _missing_packages()
    if missing:
        return (f"SLURM is not installed (missing: {', '.join(missing)}); to run these tests, as root: "
                "apt-get update && apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        return "the test cluster's munged, slurmctld and slurmd must run as root"
    return None


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _slurm_conf(root: Path, munge_socket: Path, ctld_port: int, node_ports: list[int]) -> str:
    hostname = socket.gethostname().split(".")[0]
    # CPUs etc. as slurmd itself detects them: a NodeName line that disagrees would drain the node.
    detected = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    hardware = " ".join(item for item in detected.split() if not item.startswith(("NodeName=", "UpTime=")))
    nodes = "\n".join(f"NodeName={name} NodeHostname={hostname} NodeAddr=127.0.0.1 Port={port} {hardware}"
                      for name, port in zip(NODES, node_ports))
    return f"""\
ClusterName=llmtrain-test
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job starts again after ~12-30 s instead of ~2 min (measured).
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups on these machines.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
{nodes}
PartitionName={PARTITION} Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


def _start(cluster: SlurmCluster, name: str, *command: str) -> None:
    log = open(cluster.root / "log" / f"{name}.stdout.log", "w")
    cluster.processes.append(subprocess.Popen(command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT))


def _wait_for_idle_nodes(cluster: SlurmCluster, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        for process in cluster.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited ({process.returncode}):\n{cluster.daemon_logs()}")
        result = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = result.stdout.strip()
        if result.returncode == 0 and len(states.splitlines()) == len(NODES) and all(
                line.split()[1] == "idle" for line in states.splitlines()):
            return
        time.sleep(0.5)
    raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {states!r}\n{cluster.daemon_logs()}")


def start_cluster(root: Path) -> SlurmCluster:
    for sub in ("munge", "state", "spool", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)
    key, munge_socket = root / "munge" / "munge.key", root / "munge" / "munge.socket"
    # munged refuses the packaged key (owned by the munge user) when it runs as root: make our own.
    subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
    key.chmod(0o600)
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, munge_socket, ctld_port, node_ports))
    bin_dir = str(Path(sys.executable).parent)  # jobs find this venv's python and `llmtrain` first
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}:/usr/sbin:/sbin"}
    cluster = SlurmCluster(root=root, conf=conf, env=env)
    try:
        _start(cluster, "munged", "munged", "--foreground", "--force", f"--socket={munge_socket}",
               f"--key-file={key}", f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
               f"--seed-file={root}/munge/munged.seed")
        deadline = time.monotonic() + 10
        while not munge_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        _start(cluster, "slurmctld", "slurmctld", "-D", "-i")
        for name in NODES:
            _start(cluster, f"slurmd-{name}", "slurmd", "-D", "-N", name)
        _wait_for_idle_nodes(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running two-node SLURM cluster on localhost; skipped, naming what is missing, where SLURM is not installed."""
    reason = slurm_unavailable()
    if reason is not None:
        pytest.skip(f"no real SLURM for these tests: {reason}")
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def tiny_config(folder: Path, shards: Path, steps: int, every_n_steps: int = 5) -> Path:
    """configs/quickstart.yaml shrunk to a ~78k-parameter model on the test corpus (a few ms per step on CPU).

    A whole file rather than overrides: jsonargparse cannot override one entry of the callbacks list by index.
    """
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["trainer"].update(max_steps=steps, val_check_interval=1000, limit_val_batches=2, log_every_n_steps=1,
                             enable_progress_bar=False)
    config["trainer"]["callbacks"][0]["init_args"].update(every_n_steps=every_n_steps)
    config["model"]["config"].update(vocab_size=320, d_model=32, n_layer=2, n_head=2, max_seq_len=32)
    config["model"]["optim"].update(total_steps=steps, warmup_steps=2)
    config["data"].update(data_dir=str(shards), seq_len=32, micro_batch_size=4, global_batch_size=None, num_workers=0)
    path = folder / f"tiny-{steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
