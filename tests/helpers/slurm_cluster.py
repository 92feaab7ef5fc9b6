"""A real one-node SLURM cluster on localhost for tests (Debian's slurmctld/slurmd + munge).

``tests/install_system_deps.sh`` installs the packages (CI runs as root); this module writes a
``slurm.conf`` under a temporary directory (its own ports, state and logs), starts munged,
slurmctld and slurmd, waits for the node to be idle and stops them afterwards. Without root
or the packages the fixture skips with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

CONF = """ClusterName=vpmoe-test
SlurmctldHost=localhost
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=3600
KillWait=30
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
NodeName=localhost CPUs=4 Sockets=1 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing() -> str:
    for tool in ("slurmctld", "slurmd", "sbatch", "scontrol", "munged"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is not installed (tests/install_system_deps.sh installs Debian's SLURM as root)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    return ""


class SlurmCluster:
    def __init__(self, directory: Path):
        self.dir = directory
        self.env = dict(os.environ, SLURM_CONF=str(directory / "slurm.conf"))

    def run(self, *args, check=True, timeout=60) -> subprocess.CompletedProcess:
        out = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {out.stderr or out.stdout}")
        return out

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(part.split("=", 1) for part in out.split() if "=" in part)

    def wait(self, job_id: str, timeout: float = 300, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY")) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s\n"
                           f"{(self.dir / 'slurmctld.log').read_text()[-2000:]}")


def start_cluster(directory: Path) -> SlurmCluster:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    directory.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (directory / sub).mkdir(exist_ok=True)
    (directory / "slurm.conf").write_text(CONF.format(dir=directory, ctld_port=_port(), d_port=_port()))
    cluster = SlurmCluster(directory)
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
    subprocess.run(["slurmctld"], env=cluster.env, check=True)
    subprocess.run(["slurmd"], env=cluster.env, check=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        out = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
        if out == "idle":
            return cluster
        time.sleep(0.3)
    stop_cluster(cluster)
    raise RuntimeError(f"the test SLURM node did not become idle (sinfo: {out!r}); see {directory}")


def stop_cluster(cluster: SlurmCluster) -> None:
    cluster.run("scontrol", "shutdown", check=False)
    pids = []
    for name in ("slurmd", "slurmctld"):
        pid_file = cluster.dir / f"{name}.pid"
        if pid_file.is_file():
            try:
                pids.append(int(pid_file.read_text().strip()))
                os.kill(pids[-1], 15)
            except (OSError, ValueError):
                pass
    deadline = time.time() + 15  # leave no daemon behind the test session
    while pids and time.time() < deadline:
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        time.sleep(0.2)
