"""Phase-1 distillation end to end on CPU with a real served teacher.

toy teacher (trained here) -> `vpmoe serve` subprocess -> `vpmoe distill generate` subprocess
on GSM8K prompts -> the server is killed mid-generation -> restarted -> the same command resumes
to exactly one record per prompt x sample.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from test_serve import toy_teacher_dir

PY = [sys.executable, "-m", "megatron_vpmoe.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class ServedTeacher:
    """`vpmoe serve DIR` as a subprocess on 127.0.0.1."""

    def __init__(self, model_dir: Path, port: int, log: Path):
        self.model_dir, self.port, self.log = model_dir, port, log

    def start(self) -> "ServedTeacher":
        self.proc = subprocess.Popen(
            PY + ["serve", str(self.model_dir), "--port", str(self.port), "--threads", "1"],
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT, env=_env())
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                urllib.request.urlopen(f"{self.url}/v1/models", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"server did not start:\n{self.log.read_text()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _records(out: Path) -> list:
    return [json.loads(line) for kind in ("shard", "rejected")
            for p in sorted(out.glob(f"{kind}-*.jsonl")) for line in p.open()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory, shared_data):
    """Teacher samples for 6 GSM8K prompts x 2, generated across a teacher crash."""
    work = tmp_path_factory.mktemp("distill_e2e")
    teacher_dir = toy_teacher_dir(tmp_path_factory, shared_data)
    port = _free_port()
    out = work / "gen"
    cmd = PY + ["distill", "generate", "--teacher", f"http://127.0.0.1:{port}",
                "--prompts", str(shared_data / "kd" / "gsm8k_train.jsonl"), "--limit", "6",
                "--samples", "2", "--temperature", "0.5", "--max-tokens", "160", "--seed", "3",
                "--concurrency", "1", "--shard-size", "1", "--retries", "2", "--timeout", "20",
                "--out", str(out), "--no-progress"]
    server = ServedTeacher(teacher_dir, port, work / "serve.log").start()
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        while not list(out.glob("*-*.jsonl")) and gen.poll() is None:  # first sample on disk
            time.sleep(0.02)
        server.kill()  # the teacher dies mid-generation
        _, err = gen.communicate(timeout=120)
    finally:
        server.kill()
        if gen.poll() is None:
            gen.kill()
    partial = _records(out)
    assert gen.returncode == 1, err
    assert "re-run the same command to resume" in err and 0 < len(partial) < 12

    server = ServedTeacher(teacher_dir, port, work / "serve.log").start()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    finally:
        server.kill()
    assert done.returncode == 0, done.stderr
    return {"out": out, "partial": len(partial), "summary": done.stdout, "work": work}


def test_generation_survives_teacher_crash(generated):
    out = generated["out"]
    records = _records(out)
    keys = [(r["prompt_id"], r["sample_index"]) for r in records]
    assert len(keys) == len(set(keys)) == 12  # exactly one record per prompt x sample
    assert {k[0] for k in keys} == {f"gsm8k_train.jsonl:{i}" for i in range(1, 7)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["already_done"] == generated["partial"] and summary["total_done"] == 12
    accepted = [r for r in records if "rejected" not in r]
    # the toy teacher memorised the first 4 problems: some samples pass the answer check
    assert accepted and all(r["reasoning"] and r["final"] for r in accepted)
    for r in accepted:
        assert r["reference"] in r["final"] and r["teacher_model"] == "toy_teacher"
    assert not list(out.glob(".*tmp*"))  # no half-written shards left behind
