"""Preemption: SIGTERM / SIGUSR1 ask the run to checkpoint at the next step boundary and requeue.

SLURM sends SIGTERM (or, with ``--signal=USR1@N``, SIGUSR1) before a time limit or a
preemption. The handler only sets a flag; the trainer checks it at each step boundary
(agreeing across ranks, since the signal may reach only some), saves, writes the
``{run.dir}/REQUEUE`` marker and exits with ``EXIT_REQUEUE`` (75). The marker exists because
torchrun collapses the children's exit codes; launchers look for it.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

from megatron_vpmoe.utils.atomic import atomic_write_text

REQUEUE_MARKER = "REQUEUE"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach only the main thread; a trainer run elsewhere is not preemptible
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received = signum

    def requested(self) -> bool:
        """True on every rank when any rank received a signal (a collective when distributed)."""
        import torch
        import torch.distributed as dist

        flag = self.received is not None
        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0])
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag


def write_requeue_marker(run_dir: str | Path, step: int, checkpoint: str) -> Path:
    path = Path(run_dir) / REQUEUE_MARKER
    atomic_write_text(path, f"step={step}\ncheckpoint={checkpoint}\n")
    return path


def clear_requeue_marker(run_dir: str | Path) -> None:
    (Path(run_dir) / REQUEUE_MARKER).unlink(missing_ok=True)
