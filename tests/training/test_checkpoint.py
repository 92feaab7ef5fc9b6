"""Checkpoints: atomic publish under kill -9, keep-last-N, async save, CPU loading for converters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers.paths import ROOT
from helpers.train_support import read_metrics, run_training, tiny_config

SUPPORT = ROOT / "tests" / "helpers" / "train_support.py"


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}:\n{proc.stdout.read()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("timed out")


def test_kill_9_during_save_keeps_previous_checkpoint(tmp_path):
    from megatron_vpmoe.training.checkpoint import latest_checkpoint, load_model_state_dict

    ckpts = tmp_path / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, str(SUPPORT), str(tmp_path), "--pause-save", "10:120", "train.steps=12",
         "checkpoint.interval=5"],
        cwd=ROOT, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: (ckpts / ".tmp-step_00000010" / "PAUSED").exists(), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # the half-written save is invisible; the pointer still names the previous checkpoint
    assert latest_checkpoint(ckpts).name == "step_00000005"
    assert not (ckpts / "step_00000010").exists()
    weights = load_model_state_dict(ckpts)
    assert "embedding.weight" in weights and torch.isfinite(weights["embedding.weight"]).all()

    # a fresh run resumes from step 5, clears the stale temp dir and finishes
    cfg = tiny_config(tmp_path, train={"steps": 12}, checkpoint={"interval": 5})
    assert run_training(cfg) == 0
    assert latest_checkpoint(ckpts).name == "step_00000012"
    assert not list(ckpts.glob(".tmp-*"))
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 13))


def test_keep_last_and_trainer_state(tmp_path):
    from megatron_vpmoe.training.checkpoint import list_checkpoints, read_trainer_state

    cfg = tiny_config(tmp_path, train={"steps": 8}, checkpoint={"interval": 2, "keep_last": 2},
                      log={"tensorboard": True, "interval": 2})
    assert run_training(cfg) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    names = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_00000006", "step_00000008"]
    state = read_trainer_state(tmp_path / "checkpoints" / "step_00000008")
    assert state["step"] == 8 and state["consumed_samples"] == 8 * 4
    assert state["layout"]["data"] == 1
    assert (tmp_path / "checkpoints" / "step_00000008" / "rng" / "rank_00000.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000008"


def test_async_save_matches_sync_save(tmp_path):
    from megatron_vpmoe.training.checkpoint import load_model_state_dict

    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    assert run_training(tiny_config(sync_dir, train={"steps": 6}, checkpoint={"interval": 3})) == 0
    assert run_training(tiny_config(async_dir, train={"steps": 6},
                                    checkpoint={"interval": 3, "async_save": True})) == 0
    for step in ("step_00000003", "step_00000006"):
        a = load_model_state_dict(sync_dir / "checkpoints" / step)
        b = load_model_state_dict(async_dir / "checkpoints" / step)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_checkpoint_paths_are_clear_errors(tmp_path):
    from megatron_vpmoe.training.checkpoint import latest_checkpoint, resolve_checkpoint
    from megatron_vpmoe.utils.errors import InputError

    with pytest.raises(InputError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step_00000042\n")
    with pytest.raises(InputError, match="step_00000042"):
        latest_checkpoint(tmp_path)
    bad = tmp_path / "step_00000001"
    bad.mkdir()
    (bad / ".metadata").write_bytes(b"")
    (bad / "trainer_state.json").write_text("{not json")
    from megatron_vpmoe.training.checkpoint import read_trainer_state

    with pytest.raises(InputError, match="trainer_state.json:1"):
        read_trainer_state(bad)


def _train_two_ranks(rank, world, run_dir, async_save):
    from helpers.train_support import run_training as train

    return train(tiny_config(run_dir, train={"steps": 6},
                             checkpoint={"interval": 2, "async_save": async_save}))


def test_async_save_on_two_processes(tmp_path):
    from helpers.distributed import run_distributed
    from megatron_vpmoe.training.checkpoint import load_model_state_dict

    assert run_distributed(_train_two_ranks, 2, str(tmp_path / "sync"), False) == [0, 0]
    assert run_distributed(_train_two_ranks, 2, str(tmp_path / "async"), True) == [0, 0]
    for step in ("step_00000004", "step_00000006"):
        a = load_model_state_dict(tmp_path / "sync" / "checkpoints" / step)
        b = load_model_state_dict(tmp_path / "async" / "checkpoints" / step)
        assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in read_metrics(tmp_path / "sync")]
    assert len(losses) == 6 and losses == [r["loss"] for r in read_metrics(tmp_path / "async")]


def test_load_weights_only_starts_a_fresh_run(tmp_path):
    from megatron_vpmoe.training.checkpoint import load_model_state_dict
    from megatron_vpmoe.training.trainer import Trainer
    from helpers.train_support import ByteTokenizer, datasets_for

    assert run_training(tiny_config(tmp_path / "a", train={"steps": 3})) == 0
    source = tmp_path / "a" / "checkpoints"
    cfg = tiny_config(tmp_path / "b", train={"steps": 3},
                      checkpoint={"load": str(source), "load_optimizer": False})
    trainer = Trainer(cfg, datasets=datasets_for(cfg), tokenizer=ByteTokenizer(), quiet=True)
    trainer._maybe_resume()
    assert trainer.step == 0 and not trainer.optimizer.state
    saved = load_model_state_dict(source)
    assert all(torch.equal(v, saved[k]) for k, v in trainer.raw_model.state_dict().items() if k in saved)


def test_rng_capture_and_restore_draw_identical_numbers(tmp_path):
    """What a resume relies on: after the RNG file is saved, read back and restored, python,
    numpy and torch draw what they drew right after the save (through the file format)."""
    import random

    import numpy as np

    from megatron_vpmoe.training.checkpoint_files import load_rng, restore_rng, save_rng

    def draw():
        return (random.random(), float(np.random.rand()), torch.rand(4).tolist(),
                torch.nn.functional.dropout(torch.ones(16), 0.5).tolist())

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    save_rng(tmp_path / "rng.safetensors")
    first = draw()
    draw()  # move every generator on
    restore_rng(load_rng(tmp_path / "rng.safetensors"))
    assert draw() == first
