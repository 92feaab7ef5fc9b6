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


def test_device_step_runs_reduced_on_cpu_and_meets_the_planner(tmp_path):
    """The GPU check's step benchmark, reduced to the tiny config on CPU: a run per variant, its
    metrics summarised, and the planner's prediction for the same shapes beside them."""
    import json

    out = subprocess.run([sys.executable, "benchmarks/device_step.py", "--config", "examples/configs/tiny-cpu.yaml",
                          "--set", "data.tokenizer=null", "--set", "train.schedule.warmup_steps=1",
                          "--steps", "2", "--warmup", "1", "--seq", "32", "--gbs", "2", "--mbs", "1",
                          "--variants", "bf16,bf16-autocast", "--name", "probe", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "probe_cpu.json").read_text())
    new, old = res["runs"]  # bf16 weights over the fp32 master, and the old autocast path, one run each
    for run in (new, old):
        assert run["rc"] == 0 and run["steps_logged"] == 2 and run["nonfinite_steps"] == 0
        assert 0 < run["median_step_s"] and run["peak_memory_mb"] > 0 and run["first_loss"] > 0
    assert abs(new["first_loss"] - old["first_loss"]) < 0.01 * old["first_loss"]
    assert res["plan"]["step_peak_bytes"] > 0 and res["plan"]["gpu"]
    assert "Planner (`vpmoe plan --gpu cpu`" in (tmp_path / "probe_cpu.md").read_text()


def test_kernels_merge_keeps_the_other_devices_rows(tmp_path):
    """``--merge`` adds this run's devices beside the rows already in <out>/kernels.json (a GPU
    section stays when the CPU is re-timed, and the reverse)."""
    import json

    row = {"op": "rms_norm", "dtype": "bfloat16", "triton": {"ms": 0.5, "GB/s": 1.0, "GFLOP/s": None},
           "reference": {"ms": 1.0, "GB/s": 0.5, "GFLOP/s": None}, "naive": {"ms": 2.0, "GB/s": 0.25, "GFLOP/s": None}}
    (tmp_path / "kernels.json").write_text(json.dumps({"devices": {"cuda": [row]}, "gpu_name": "Some GPU"}))
    out = subprocess.run([sys.executable, "benchmarks/kernels.py", "--devices", "cuda", "--merge", "--skip-memory",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    merged = json.loads((tmp_path / "kernels.json").read_text())
    assert merged["devices"]["cuda"] == [row] and "gpu" not in merged
    md = (tmp_path / "kernels.md").read_text()
    assert "## cuda (Some GPU)" in md and "| rms_norm | bfloat16 | 0.5 (1.0) | 1.0 (0.5) | 2.0 (0.25) | 2.00x | 2.00x |" in md


def test_casts_benchmark_counts_one_weight_cast_per_step(tmp_path):
    """benchmarks/casts.py, reduced (seq 32, micro-batch 1, 4 micro-batches): bf16 weights over
    fp32 master cast each weight once per step (<= 1.0x the bf16 parameter bytes); autocast over
    fp32 weights casts them per use and per micro-batch (well above 1x)."""
    import json

    out = subprocess.run([sys.executable, "benchmarks/casts.py", "--seq", "32", "--micro-batch", "1",
                          "--threads", "1", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "casts.json").read_text())
    assert res["new"]["weight_cast_ratio"] <= 1.0 < 2.0 < res["old"]["weight_cast_ratio"]
    assert 0 < res["new"]["aten_ops"] and (tmp_path / "casts.md").read_text().startswith("# Casts")
