"""Preemption (SIGTERM -> checkpoint + exit 75 + REQUEUE marker) and the non-finite step guard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers.paths import ROOT
from helpers.train_support import ByteTokenizer, datasets_for, read_metrics, run_training, tiny_config

SUPPORT = ROOT / "tests" / "helpers" / "train_support.py"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_saves_and_exits_for_requeue(tmp_path, sig):
    from megatron_vpmoe.training.checkpoint import latest_checkpoint, read_trainer_state
    from megatron_vpmoe.utils.errors import EXIT_REQUEUE

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # with reader workers, signalled together with the trainer (as SLURM signals the whole job)
    proc = subprocess.Popen([sys.executable, str(SUPPORT), str(tmp_path), "train.steps=100000",
                             "data.num_workers=1"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline
            time.sleep(0.1)
        os.killpg(proc.pid, sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_REQUEUE, out
    assert "preempted" in out
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    step = read_trainer_state(ckpt)["step"]
    assert step >= 3
    marker = (tmp_path / "REQUEUE").read_text()
    assert f"step={step}" in marker and ckpt.name in marker
    # the requeued job resumes from there and the marker goes away
    cfg = tiny_config(tmp_path, train={"steps": step + 2})
    assert run_training(cfg) == 0
    assert not (tmp_path / "REQUEUE").exists()
    assert read_metrics(tmp_path)[-1]["step"] == step + 2


def test_injected_nan_step_is_skipped(tmp_path, monkeypatch):
    from megatron_vpmoe.training.trainer import Trainer

    monkeypatch.setenv("VPMOE_TEST_NAN_STEPS", "4")
    cfg = tiny_config(tmp_path, train={"steps": 6})
    trainer = Trainer(cfg, datasets=datasets_for(cfg), tokenizer=ByteTokenizer(), quiet=True)
    snapshots = {}
    original = trainer.train_step

    def spy(micro, inject_nan=False):
        before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
        out = original(micro, inject_nan)
        snapshots[trainer.step + 1] = (before, {k: v.clone() for k, v in trainer.raw_model.state_dict().items()})
        return out

    trainer.train_step = spy
    assert trainer.run() == 0
    records = read_metrics(tmp_path)
    assert [r["skipped"] for r in records] == [False, False, False, True, False, False]
    assert records[3]["loss"] == "nan"
    before, after = snapshots[4]
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and router bias untouched
    before, after = snapshots[5]
    assert not all(torch.equal(before[k], after[k]) for k in before)  # training goes on
    assert all(isinstance(r["loss"], float) for r in records[4:])


def test_too_many_nonfinite_steps_stop_with_last_checkpoint_intact(tmp_path, monkeypatch):
    from megatron_vpmoe.training.checkpoint import latest_checkpoint, read_trainer_state
    from megatron_vpmoe.training.trainer import NonFiniteError

    monkeypatch.setenv("VPMOE_TEST_NAN_STEPS", "3,4,5")
    cfg = tiny_config(tmp_path, train={"steps": 10, "max_nonfinite_steps": 3}, checkpoint={"interval": 2})
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row .* step 5.*step_00000004"):
        run_training(cfg)
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert read_trainer_state(ckpt)["step"] == 4
