"""Every ``benchmarks/*.py`` runs as a script (``python benchmarks/X.py``, which puts
``benchmarks/`` first on ``sys.path``) without its sibling files shadowing packages:
``benchmarks/kernels.py`` must not stand in for the ``megatron_vpmoe.kernels`` package, nor
``benchmarks/tokenizers.py`` for the Hugging Face ``tokenizers`` library; ``--help`` only prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.paths import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))

PROBE = """
import runpy, sys
script = sys.argv[1]
sys.path.insert(0, 'benchmarks')   # what `python benchmarks/X.py` does
sys.argv = [script, '--help']
try:
    runpy.run_path(script, run_name='__main__')
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
import megatron_vpmoe.kernels as kernels, tokenizers
print(kernels.__file__)
print(tokenizers.__file__)
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_imports_the_real_packages(script):
    env = dict(os.environ, PYTHONPATH="")
    results = {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").glob("*")}
    out = subprocess.run([sys.executable, "-c", PROBE, f"benchmarks/{script}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # --help only prints: no benchmark ran and no committed result was rewritten
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks" / "results").glob("*")} == results
    kernels_file, tokenizers_file = out.stdout.strip().splitlines()[-2:]
    assert Path(kernels_file) == ROOT / "megatron_vpmoe" / "kernels" / "__init__.py"  # the link to kernels/
    assert "benchmarks" not in Path(tokenizers_file).parts and "site-packages" in tokenizers_file
