"""`vpmoe train` from the command line: help, config errors as one line + exit 2, and an end-to-end
run on the data package's datasets (mock data) with 2 processes under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers.distributed import free_port
from helpers.paths import ROOT

pytestmark = pytest.mark.e2e

TINY = ["--set", "model.vocab_size=512", "--set", "model.hidden_size=32", "--set", "model.num_layers=2",
        "--set", "model.num_attention_heads=2", "--set", "model.num_query_groups=1",
        "--set", "model.kv_channels=16", "--set", "model.ffn_hidden_size=64",
        "--set", "model.moe_ffn_hidden_size=32", "--set", "model.moe_shared_expert_intermediate_size=32",
        "--set", "data.seq_length=32", "--set", "data.mock=true", "--set", "data.tokenizer=null",
        "--set", "train.global_batch_size=4", "--set", "train.micro_batch_size=1",
        "--set", "train.schedule.warmup_steps=2", "--set", "train.eval_interval=4",
        "--set", "train.eval_iters=1", "--set", "log.progress_bar=false"]


def _vpmoe(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_vpmoe.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def test_help_and_config_errors(tmp_path):
    out = _vpmoe("train", "--help")
    assert out.returncode == 0 and "--config" in out.stdout and "75" in out.stdout
    out = _vpmoe("train", "--config", "examples/configs/tiny-cpu.yaml", "--set", "train.stepz=3")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "train.stepz" in out.stderr and "steps" in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  global_batch_size: 6\n  micro_batch_size: 4\ndata:\n  mock: true\n")
    out = _vpmoe("train", "--config", str(bad))
    assert out.returncode == 2 and "train.global_batch_size" in out.stderr and str(bad) in out.stderr


def test_torchrun_two_processes_end_to_end(tmp_path):
    pytest.importorskip("megatron_vpmoe.data.dataset", reason="data package (issue 3) not landed")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megatron_vpmoe.cli", "train", "--config", "examples/configs/tiny-cpu.yaml", *TINY,
           "--set", f"run.dir={tmp_path}", "--set", "train.steps=8", "--set", "checkpoint.interval=4"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "trained steps 0..8" in out.stdout
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert len([r for r in records if r["kind"] == "valid"]) == 2
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert (tmp_path / "config.yaml").is_file()
