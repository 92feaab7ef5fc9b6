"""``vpmoe launch local`` (torchrun on this host) and ``vpmoe launch mpi`` (OpenMPI's mpirun).

Both start ``vpmoe train`` once per rank and pass the exit code through (torchrun through
:func:`torchrun`, which returns the failed rank's own code instead of torchrun's 1 and
traceback). What the trainer checks at start without a model is checked before any rank starts
(``precheck.py``); a Ctrl-C saves a checkpoint (a second one aborts). A run stopped by a
preemption signal leaves ``{run.dir}/REQUEUE`` (torchrun collapses the ranks' exit code 75);
the launcher then says so and exits 75, and the same command resumes from the checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional

from megatron_vpmoe.utils.errors import EXIT_REQUEUE, UsageError, VpmoeError
from megatron_vpmoe.utils.proc_tree import kill_tree


def _train_args(config: str, overrides: List[str]) -> List[str]:
    args = ["-m", "megatron_vpmoe.cli", "train", "--config", config]
    for override in overrides:
        args += ["--set", override]
    return args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(nproc: int, config: str, overrides: List[str], python: str = sys.executable) -> List[str]:
    if nproc < 1:
        raise UsageError("--nproc must be >= 1")
    return [python, "-m", "megatron_vpmoe.launch.local", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
            *_train_args(config, overrides)]


def mpirun_command(np: int, config: str, overrides: List[str], hostfile: Optional[str] = None,
                   python: str = sys.executable) -> List[str]:
    if np < 1:
        raise UsageError("--np must be >= 1")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise VpmoeError("mpirun not found (install OpenMPI: apt-get install openmpi-bin)")
    cmd = [mpirun, "-np", str(np)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if hostfile:
        cmd += ["--hostfile", hostfile]
        master = Path(hostfile).read_text().split()[0]
    else:
        cmd.append("--oversubscribe")  # one host: more ranks than cores is fine for CPU runs
        master = "127.0.0.1"
    cmd += ["-x", f"MASTER_ADDR={master}", "-x", f"MASTER_PORT={_free_port()}", "-x", "PATH",
            "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
    if "VPMOE_VERBOSE" in os.environ:  # --verbose reaches the ranks
        cmd += ["-x", "VPMOE_VERBOSE"]
    cmd += [python, *_train_args(config, overrides)]
    return cmd


def _package_parent() -> str:
    """The folder holding the ``megatron_vpmoe`` this launcher runs (a checkout, or site-packages
    when installed): put first on the ranks' ``PYTHONPATH`` so they import the same code."""
    import megatron_vpmoe

    return str(Path(megatron_vpmoe.__file__).resolve().parents[1])


def run_launcher(build_cmd: Callable[[], List[str]], config: str, overrides: List[str], world_size: int,
                 usr1_as_term: bool = False) -> int:
    """Run ``build_cmd()`` (``world_size`` ranks) forwarding SIGTERM/SIGUSR1/SIGINT/SIGHUP to it; map a
    preemption or a Ctrl-C to exit 75. The config and what the trainer checks at start without
    a model (:func:`~megatron_vpmoe.launch.precheck.check_before_launch`) are validated before
    the command is built (so a bad config is reported once, before, say, a missing mpirun).

    The command runs in its own session, so a Ctrl-C on the terminal reaches only this launcher:
    the first is forwarded as SIGINT (the ranks checkpoint at the end of the step and stop), a
    second kills the whole process tree without saving; a closed terminal (SIGHUP) is forwarded
    as SIGTERM, since the hang-up no longer reaches the ranks. ``usr1_as_term``: torchrun forwards
    SIGTERM/SIGINT to its workers but dies on SIGUSR1, so USR1 is delivered to it as SIGTERM
    (the trainer treats both as "checkpoint and stop")."""
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.launch.precheck import check_before_launch
    from megatron_vpmoe.training.preemption import LAUNCHER_ENV, RESUME_HINT

    cfg = load_config(config, overrides)  # validates before starting ranks
    check_before_launch(cfg, world_size)  # one line now, not one per rank after half a minute
    run_dir = Path(cfg.run.dir)
    cmd = build_cmd()
    marker = run_dir / "REQUEUE"
    marker.unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = _package_parent() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env[LAUNCHER_ENV] = "1"  # the ranks leave the resume hint to this launcher
    print("[vpmoe] " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    previous, interrupts = {}, []

    def forward(signum, frame):  # noqa: ARG001 - signal handler signature
        if signum == signal.SIGINT:
            interrupts.append(signum)
            if len(interrupts) > 1:  # the second Ctrl-C: abort, nothing saved
                kill_tree(proc.pid)
                return
            print("\n[vpmoe] interrupted: the ranks save a checkpoint after this step (Ctrl-C again to abort)",
                  file=sys.stderr, flush=True)
        as_term = signum == signal.SIGHUP or (usr1_as_term and signum == signal.SIGUSR1)
        proc.send_signal(signal.SIGTERM if as_term else signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        previous[sig] = signal.signal(sig, forward)
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if len(interrupts) > 1:
        print("[vpmoe] aborted: the ranks were stopped without saving", file=sys.stderr, flush=True)
        return 130
    if marker.is_file():
        what = "interrupted" if interrupts else "preempted"
        print(f"[vpmoe] {what}: the run checkpointed ({marker}); {RESUME_HINT}", flush=True)
        return EXIT_REQUEUE
    return code


def torchrun(argv: List[str]) -> int:
    """torchrun (same flags), but a failed rank's exit code is the result, without torchrun's
    traceback: a rank that exits 2 after its one-line error makes the launcher exit 2, not 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    _quiet_torchrun_logs()
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as err:
        codes = [f.exitcode for _rank, f in sorted(err.failures.items())]
        return next((c for c in codes if c > 0), 1)  # killed by a signal (negative): a failure
    except SignalException as err:  # SIGTERM/SIGINT reached torchrun: the workers were stopped
        return 128 + int(err.sigval)
    return 0


def _quiet_torchrun_logs() -> None:
    """torchrun's own warnings and failure reports off (unless ``--verbose``): a failed rank's error
    and exit code say it, a Ctrl-C or preemption is reported by the launcher, once."""
    import logging

    from megatron_vpmoe.utils.notices import verbose

    if verbose():
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # each sets its own level ($LOGLEVEL)


if __name__ == "__main__":  # what torchrun_command runs
    sys.exit(torchrun(sys.argv[1:]))
