"""A process tree (Linux /proc): measure a command's wall time and peak resident memory, or kill the whole tree."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple


def _children(pid: int) -> List[int]:
    out: List[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, IndexError, ValueError):
        return 0


def descendants(pid: int) -> List[int]:
    """Every process below ``pid`` (children in other sessions included, as torchrun's workers are)."""
    out, stack = [], _children(pid)
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(_children(p))
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid`` and all its descendants (those gone already are skipped)."""
    for p in [pid, *descendants(pid)]:  # listed before any dies: an orphan is re-parented away
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants now."""
    return sum(_rss_kib(p) for p in [pid, *descendants(pid)]) * 1024


def run_measured(cmd: Sequence[str], *, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                 interval: float = 0.02) -> Tuple[float, int, subprocess.CompletedProcess]:
    """``(seconds, peak process-tree RSS bytes sampled every interval, result)``; output captured."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    out: Dict[str, str] = {}

    def drain(name, stream):
        out[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s), daemon=True)
               for n, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    while proc.poll() is None:
        peak = max(peak, tree_rss_bytes(proc.pid))
        time.sleep(interval)
    seconds = time.perf_counter() - start
    for r in readers:
        r.join()
    return seconds, peak, subprocess.CompletedProcess(list(cmd), proc.returncode, out.get("stdout", ""),
                                                      out.get("stderr", ""))
