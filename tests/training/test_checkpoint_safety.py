"""Checkpoints are data, not code, and are verified before use: planted pickle payloads (RNG file,
DCP ``.metadata``, a non-tensor value in a ``.distcp``) never run and give one clear error (exit 2
from the CLI); a flipped byte or a truncated file is detected against ``manifest.json`` and
``checkpoint.load: auto`` falls back to the newest intact checkpoint; a changed model is refused
naming the keys; a missing RNG file is an error; format-2 checkpoints still load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.paths import ROOT
from helpers.train_support import ByteTokenizer, datasets_for, run_training, tiny_config


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("source")
    assert run_training(tiny_config(run, train={"steps": 4}, checkpoint={"interval": 2})) == 0
    return run


def _copy(source, tmp_path) -> Path:
    shutil.copytree(source / "checkpoints", tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def _reseal(ckpt: Path) -> None:
    """Rewrite manifest.json to match the files as they are now (an attacker can)."""
    from megatron_vpmoe.training.checkpoint_manifest import MANIFEST, file_entry

    manifest = json.loads((ckpt / MANIFEST).read_text())
    manifest["files"] = {name: file_entry(ckpt / name) for name in manifest["files"] if (ckpt / name).is_file()}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def _trainer(run_dir, **sections):
    from megatron_vpmoe.training.trainer import Trainer

    cfg = tiny_config(run_dir, train={"steps": 4}, **sections)
    return Trainer(cfg, datasets=datasets_for(cfg), tokenizer=ByteTokenizer(), quiet=True)


def _load_error(trainer) -> str:
    from megatron_vpmoe.utils.errors import InputError

    with pytest.raises(InputError) as err:
        trainer._maybe_resume()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_planted_payloads_never_run(source, tmp_path):
    from megatron_vpmoe.training.checkpoint import load_model_state_dict
    from megatron_vpmoe.utils.errors import InputError

    marker = tmp_path / "PWNED"
    ckpts = _copy(source, tmp_path)
    ckpt = ckpts / "step_00000004"
    trainer = _trainer(tmp_path)
    # the RNG file (resealed: the manifest is a checksum, not a signature)
    (ckpt / "rng" / "rank_00000.safetensors").write_bytes(__import__("pickle").dumps(_Payload(marker)))
    _reseal(ckpt)
    assert "rank_00000.safetensors" in _load_error(trainer)
    # DCP's .metadata: the resume and the converters' reader
    shutil.rmtree(ckpts)
    ckpt = _copy(source, tmp_path) / "step_00000004"
    (ckpt / ".metadata").write_bytes(__import__("pickle").dumps(_Payload(marker)))
    _reseal(ckpt)
    assert "not valid DCP metadata" in _load_error(trainer) and "posix.system" in _load_error(trainer)
    with pytest.raises(InputError, match="not valid DCP metadata"):
        load_model_state_dict(ckpt)
    # a format-2 RNG file (torch.save pickle), no manifest in that format
    shutil.rmtree(ckpts)
    ckpt = _copy(source, tmp_path) / "step_00000004"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps(dict(state, format=2)))
    (ckpt / "manifest.json").unlink()
    torch.save({"python": _Payload(marker)}, ckpt / "rng" / "rank_00000.pt")
    assert "rank_00000.pt" in _load_error(trainer)
    assert not marker.exists()


def test_planted_payload_in_a_distcp_value_never_runs(tmp_path):
    """A non-tensor value (an optimizer hyperparameter) is pickled inside a .distcp file."""
    from megatron_vpmoe.training.checkpoint import CheckpointManager
    from megatron_vpmoe.utils.errors import InputError

    marker = tmp_path / "PWNED"
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    opt.param_groups[0]["eps"] = _Payload(marker)
    CheckpointManager(tmp_path / "c").save(1, model, opt, {})
    fresh = torch.nn.Linear(4, 4)
    with pytest.raises(InputError, match="param_groups.weight.eps.*not plain data") as err:
        CheckpointManager(tmp_path / "c").load(tmp_path / "c", fresh, torch.optim.AdamW(fresh.parameters()))
    assert "\n" not in str(err.value) and not marker.exists()


def _vpmoe_train(config: Path, *overrides):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = [a for o in overrides for a in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "megatron_vpmoe.cli", "train", "--config", str(config), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_refuses_payloads_and_model_changes_with_one_line(source, tmp_path):
    from megatron_vpmoe.config import dump_config

    marker = tmp_path / "PWNED"
    ckpt = _copy(source, tmp_path) / "step_00000004"
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(tiny_config(tmp_path, train={"steps": 6})))
    (ckpt / "rng" / "rank_00000.safetensors").write_bytes(__import__("pickle").dumps(_Payload(marker)))
    _reseal(ckpt)
    out = _vpmoe_train(config)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().count("\n") == 0 and "rank_00000.safetensors" in out.stderr
    assert not marker.exists()
    out = _vpmoe_train(config, "model.num_layers=3", "model.rotary_base=500000")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "model.num_layers (2 -> 3)" in out.stderr and "model.rotary_base" in out.stderr
    (ckpt / ".metadata").write_bytes(__import__("pickle").dumps(_Payload(marker)))
    _reseal(ckpt)
    out = _vpmoe_train(config)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().count("\n") == 0 and ".metadata: not valid DCP metadata" in out.stderr
    assert not marker.exists()


def test_damage_is_detected_and_auto_falls_back(source, tmp_path, capsys):
    from megatron_vpmoe.training.checkpoint import load_model_state_dict
    from megatron_vpmoe.training.checkpoint_manifest import DamagedCheckpointError

    ckpts = _copy(source, tmp_path)
    # a binary 'latest' pointer: auto resume says so and takes the newest intact checkpoint
    (ckpts / "latest").write_bytes(b"\xff\xfe\x00garbage")
    trainer = _trainer(tmp_path)
    trainer._maybe_resume()
    assert trainer.step == 4 and "does not name a checkpoint" in capsys.readouterr().err
    (ckpts / "latest").write_text("step_00000004\n")
    shard = ckpts / "step_00000004" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    trainer = _trainer(tmp_path)
    trainer._maybe_resume()  # auto: the latest is damaged, the one before is used
    assert trainer.step == 2 and trainer.loaded_from.endswith("step_00000002")
    warning = capsys.readouterr().err
    assert "step_00000004" in warning and "damaged" in warning and "__0_0.distcp" in warning
    named = _trainer(tmp_path, checkpoint={"load": str(ckpts / "step_00000004")})
    assert "__0_0.distcp: sha256 differs" in _load_error(named)
    with pytest.raises(DamagedCheckpointError):
        load_model_state_dict(ckpts / "step_00000004")
    # a truncated .metadata
    metadata = ckpts / "step_00000002" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:-10])
    named = _trainer(tmp_path, checkpoint={"load": str(ckpts / "step_00000002")})
    assert ".metadata:" in _load_error(named) and "bytes, the manifest says" in _load_error(named)
    # every checkpoint damaged: one error, nothing silently skipped
    assert "every checkpoint is damaged" in _load_error(_trainer(tmp_path))


def test_model_changes_are_refused_training_only_keys_are_not(source, tmp_path):
    _copy(source, tmp_path)
    message = _load_error(_trainer(tmp_path, model={"hidden_size": 64, "window_size": 8}))
    assert "model.hidden_size (32 -> 64)" in message and "model.window_size (16 -> 8)" in message
    weights_only = _trainer(tmp_path, model={"num_moe_experts": 8}, checkpoint={"load_optimizer": False})
    assert "model.num_moe_experts (4 -> 8)" in _load_error(weights_only)
    trainer = _trainer(tmp_path, model={"moe_router_bias_update_rate": 0.02})  # how it trains, not what it is
    trainer._maybe_resume()
    assert trainer.step == 4


def test_missing_rng_file_is_an_error(source, tmp_path):
    ckpt = _copy(source, tmp_path) / "step_00000004"
    (ckpt / "rng" / "rank_00000.safetensors").unlink()
    _reseal(ckpt)  # dropped from the manifest too: only the loader can notice
    message = _load_error(_trainer(tmp_path))
    assert "rank_00000.safetensors: missing" in message


def test_ranks_beyond_the_saved_world_reuse_rank0_rng(tmp_path, monkeypatch, capsys):
    """Loading a 1-process checkpoint as rank 1 of 2 (the rank lookup, without spawning ranks)."""
    import megatron_vpmoe.training.checkpoint as checkpoint

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    torch.manual_seed(5)
    checkpoint.CheckpointManager(tmp_path).save(1, model, opt, {})
    expected = torch.rand(4)
    monkeypatch.setattr(checkpoint, "world", lambda: (1, 2))
    path = checkpoint.CheckpointManager._rng_file(tmp_path / "step_00000001", {"format": 3, "world_size": 1})
    assert path.name == "rank_00000.safetensors"
    monkeypatch.setattr(checkpoint, "world", lambda: (0, 2))  # rank 0 prints the warning
    checkpoint.CheckpointManager(tmp_path).load(tmp_path, model, opt)
    assert torch.equal(torch.rand(4), expected)
    assert "saved by 1 processes; ranks 1 and up reuse rank 0's RNG streams" in capsys.readouterr().err


def test_format2_checkpoint_still_loads(tmp_path):
    """Format 2 (full tensors written by every rank, no manifest, torch.save RNG files)."""
    import random

    import numpy as np
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from megatron_vpmoe.utils.errors import InputError

    old = _trainer(tmp_path / "old")
    model, opt = old.raw_model, old.optimizer
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1], labels=ids[:, 1:]).mean().backward()
    opt.step()
    ckpt = tmp_path / "old" / "checkpoints" / "step_00000003"
    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt), no_dist=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"format": 2, "step": 3, "consumed_samples": 12,
                                                         "global_batch_size": 4}))
    (ckpt / "rng").mkdir()
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               ckpt / "rng" / "rank_00000.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    (ckpt.parent / "latest").write_text(ckpt.name + "\n")
    new = _trainer(tmp_path / "old", model={}, run={"seed": 99})
    new._maybe_resume()
    assert new.step == 3
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    for key, value in model.state_dict().items():
        assert torch.equal(value, new.raw_model.state_dict()[key]), key
    p_old, p_new = next(model.parameters()), next(new.raw_model.parameters())
    assert torch.equal(opt.state[p_old]["exp_avg"], new.optimizer.state[p_new]["exp_avg"])
    # a format-3 checkpoint without its manifest is not taken for a format-2 one
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps(dict(state, format=3)))
    with pytest.raises(InputError, match="manifest.json: missing"):
        _trainer(tmp_path / "old", checkpoint={"load": str(ckpt)})._maybe_resume()
