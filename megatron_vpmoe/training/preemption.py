"""Preemption and Ctrl-C: SIGTERM / SIGUSR1 / SIGINT ask the run to checkpoint at the next step boundary and stop.

SLURM sends SIGTERM (or, with ``--signal=USR1@N``, SIGUSR1) before a time limit or a
preemption; Ctrl-C sends SIGINT. The handler only sets a flag; the trainer checks it at each
step boundary (agreeing across ranks, since the signal may reach only some), saves, writes the
``{run.dir}/REQUEUE`` marker and exits with ``EXIT_REQUEUE`` (75). The marker exists because
torchrun collapses the children's exit codes; launchers look for it. A second SIGINT aborts
at once (``KeyboardInterrupt``), without saving.

``vpmoe launch local|mpi`` sets ``VPMOE_LAUNCHER=1`` in the ranks' environment: the launcher
then prints the resume hint itself, once, and the ranks leave it out.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from megatron_vpmoe.utils.atomic import atomic_write_text
from megatron_vpmoe.utils.errors import EXIT_REQUEUE

REQUEUE_MARKER = "REQUEUE"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
LAUNCHER_ENV = "VPMOE_LAUNCHER"  # set by our launchers, which print the resume hint themselves
RESUME_HINT = "run the same command again to resume"


class PreemptionHandler:
    def __init__(self, announce: bool = True):
        self.received: Optional[int] = None
        # say on stderr that a Ctrl-C was heard (rank 0; a launcher says it itself)
        self.announce = announce and os.environ.get(LAUNCHER_ENV) != "1"
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
        if signum == signal.SIGINT:
            if self.received == signal.SIGINT:  # the second Ctrl-C: abort without saving
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            if self.announce:
                sys.stderr.write("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to abort)\n")
                sys.stderr.flush()
        if self.received is None or signum == signal.SIGINT:
            self.received = signum

    def saved_message(self, path: str, step: int) -> str:
        """What rank 0 prints after the stop checkpoint: the resume hint unless a launcher prints it."""
        what = "interrupted" if self.received == signal.SIGINT else "preempted"
        if os.environ.get(LAUNCHER_ENV) == "1":
            return f"{what}: saved {path} at step {step}"
        if self.received == signal.SIGINT:
            return f"{what}: saved {path} at step {step}; {RESUME_HINT}"
        return f"{what}: saved {path} at step {step}; exiting with {EXIT_REQUEUE} (requeue)"

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
