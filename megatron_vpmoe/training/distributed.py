"""Rank discovery and process-group setup for every launcher the stack supports.

One function, :func:`discover_ranks`, reads the rank / world size / local rank that the
launcher exported — torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), SLURM's srun
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``) or OpenMPI's mpirun
(``OMPI_COMM_WORLD_RANK``/``OMPI_COMM_WORLD_SIZE``/``OMPI_COMM_WORLD_LOCAL_RANK``) — and
:func:`init_distributed` turns it into a ``torch.distributed`` process group over the
``env://`` rendezvous (``MASTER_ADDR``/``MASTER_PORT``). The launch tooling relies on both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

from megatron_vpmoe.utils.errors import VpmoeError

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job, and which launcher said so."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "slurm", "mpi" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise VpmoeError(f"environment variable {key}={env[key]!r} is not an integer") from None


def discover_ranks(env: Optional[Mapping[str, str]] = None) -> RankInfo:
    """Rank, world size and local rank from the launcher's environment variables.

    Precedence: torchrun's variables (also what a wrapper sets explicitly), then SLURM, then
    OpenMPI; with none of them this is a single process.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        launcher = "slurm"
    elif "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0
        launcher = "mpi"
    else:
        return RankInfo(0, 1, 0, "single")
    if world < 1 or not 0 <= rank < world:
        raise VpmoeError(f"{launcher}: rank {rank} is outside world size {world}")
    return RankInfo(rank, world, local, launcher)


def _slurm_master_addr(env: Mapping[str, str]) -> Optional[str]:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return nodelist.split(",")[0] if "[" not in nodelist else None


def rendezvous_env(info: RankInfo, env: Optional[Mapping[str, str]] = None) -> dict:
    """The ``env://`` variables for ``info``: MASTER_ADDR/PORT from the environment, else derived.

    SLURM: the first host of the job's node list and a port derived from the job id; mpirun and
    single-node runs default to 127.0.0.1:29500.
    """
    env = os.environ if env is None else env
    addr = env.get("MASTER_ADDR")
    port = env.get("MASTER_PORT")
    if info.launcher == "slurm":
        addr = addr or _slurm_master_addr(env)
        if not port and env.get("SLURM_JOB_ID", "").isdigit():
            port = str(20000 + int(env["SLURM_JOB_ID"]) % 10000)
    if port is not None and port.strip() == "0" and info.world_size > 1:
        raise VpmoeError("MASTER_PORT=0: the ranks cannot meet on port 0 (torchrun --master-port 0 "
                         "exports it as is); pass a free port, e.g. --master-port 29511")
    return {
        "MASTER_ADDR": addr or "127.0.0.1",
        "MASTER_PORT": port or str(DEFAULT_MASTER_PORT),
        "RANK": str(info.rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank),
    }


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0) -> RankInfo:
    """Initialise the default process group if the launcher started more than one process.

    Already-initialised groups are reused (tests, engines that set up their own). The backend
    defaults to NCCL with CUDA and gloo otherwise; with CUDA the local rank picks the device.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        info = discover_ranks()
        rank, world = dist.get_rank(), dist.get_world_size()
        return RankInfo(rank, world, info.local_rank if info.world_size == world else rank, info.launcher)
    info = discover_ranks()
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if info.world_size == 1:
        return info
    os.environ.update(rendezvous_env(info))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method="env://", rank=info.rank,
                            world_size=info.world_size, timeout=timedelta(seconds=timeout_s))
    return info


def world() -> tuple[int, int]:
    """(rank, world size) of the default group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (on every rank)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
