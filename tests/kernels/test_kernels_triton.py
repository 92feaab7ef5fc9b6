"""Runs tests/kernels/test_kernels_triton_cases.py (Triton kernels vs references) in a subprocess: under
``TRITON_INTERPRET=1`` on CPU, and compiled on the GPU when one is present."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from helpers.paths import ROOT, TESTS

pytest.importorskip("triton")


def _run_cases(marker: str, device: str = "cpu") -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", VPMOE_KERNEL_TEST_DEVICE=device)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", marker,
           str(TESTS / "kernels" / "test_kernels_triton_cases.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    passed = re.search(r"(\d+) passed", tail.splitlines()[-1])
    assert passed and int(passed.group(1)) >= 2, tail  # the cases ran (were not skipped as a module)


def test_triton_kernels_match_references_under_interpreter():
    _run_cases("not long")


@pytest.mark.long
def test_triton_kernels_match_references_large_shapes():
    _run_cases("long")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU run of the kernels pending")
def test_triton_kernels_match_references_on_gpu():
    _run_cases("long or not long", device="cuda")
