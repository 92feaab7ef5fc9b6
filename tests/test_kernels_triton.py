"""Runs tests/test_kernels_triton_cases.py (Triton kernels vs references) in a TRITON_INTERPRET=1 subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("triton")


def _run_cases(marker: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", marker,
           str(ROOT / "tests" / "test_kernels_triton_cases.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail


def test_triton_kernels_match_references_under_interpreter():
    _run_cases("not long")


@pytest.mark.long
def test_triton_kernels_match_references_large_shapes():
    _run_cases("long")
