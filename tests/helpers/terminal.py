"""A command run in a pseudo-terminal, as a person at a terminal runs it (no tests here).

Python's ``pty`` gives a terminal that reports 0 x 0 characters, as ``docker exec -t`` and
``script`` often do; writing ``\\x03`` to it is a real Ctrl-C (the terminal sends SIGINT to the
foreground process group).
"""

from __future__ import annotations

import os
import pty
import select
import time
from typing import Callable, Dict, List, Optional

from megatron_vpmoe.utils.proc_tree import kill_tree


class Terminal:
    def __init__(self, argv: List[str], env: Dict[str, str], cwd: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes the terminal's session and foreground group
            try:
                os.chdir(cwd)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.output = b""
        self.returncode: Optional[int] = None

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def _read(self, timeout: float) -> bool:
        """Read what is there within ``timeout``; False once the terminal is closed."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: every process holding the terminal is gone
            return False
        self.output += data
        return bool(data)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> bool:
        """Read until ``predicate(text)`` holds (True) or the command ends or ``timeout`` passes (False)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate(self.text):
                return True
            if not self._read(0.1):
                return predicate(self.text)
        return False

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")

    def finish(self, timeout: float) -> int:
        """Read to the end; the exit code (the process group is killed after ``timeout``)."""
        deadline = time.time() + timeout
        while time.time() < deadline and self._read(0.1):
            pass
        if time.time() >= deadline:
            kill_tree(self.pid)  # the launcher's ranks too (they run in sessions of their own)
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode
