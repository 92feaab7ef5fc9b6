"""``vpmoe serve`` as a child process on 127.0.0.1: started, waited for, stopped (stages and benchmarks that need a teacher URL)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from megatron_vpmoe.utils.errors import VpmoeError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedModel:
    """``vpmoe serve MODEL_DIR --port P --threads 1 [extra]`` with its output in ``log``; a context
    manager that returns once ``/v1/models`` answers and stops the server on exit."""

    def __init__(self, model_dir, log, extra: Sequence[str] = (), timeout_s: float = 180.0, server: str = "vpmoe"):
        """``server="transformers"``: the same directory under ``transformers serve`` (third party)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        if server == "transformers":
            cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1",
                   "--port", str(self.port), "--device", "cpu", "--dtype", "float32", *extra]
        else:
            cmd = [sys.executable, "-m", "megatron_vpmoe.cli", "serve", str(model_dir), "--port", str(self.port),
                   "--threads", "1", *extra]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})

    def __enter__(self) -> "ServedModel":
        deadline = time.time() + self.timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise VpmoeError(f"the model server exited ({self.proc.returncode}); see {self.log}")
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise VpmoeError(f"the model server did not answer within {self.timeout_s:.0f} s; see {self.log}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
