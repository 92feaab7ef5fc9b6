"""Manifest coverage: every file a save writes is listed (trainer_state.json, config.yaml, .metadata, the
shards, the RNG file), each rank lists exactly its own files, and editing any listed file is refused
naming it; a refused pickled RNG file names the global it references, not torch's advice to load
it unsafely. A save of a two-parameter module: seconds."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

EXPECTED = {".metadata", "__0_0.distcp", "config.yaml", "rng/rank_00000.safetensors", "trainer_state.json"}


@pytest.fixture
def saved(tmp_path):
    from megatron_vpmoe.training.checkpoint import CheckpointManager

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return CheckpointManager(tmp_path / "ckpts").save(1, model, opt, {"consumed_samples": 4},
                                                      config_text="model: {}\n")


def _files(ckpt):
    return {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}


def test_manifest_lists_every_file_the_save_wrote(saved):
    from megatron_vpmoe.training.checkpoint_manifest import MANIFEST, file_entry

    manifest = json.loads((saved / MANIFEST).read_text())
    assert set(manifest["files"]) == EXPECTED
    assert _files(saved) == EXPECTED | {MANIFEST}
    for name, entry in manifest["files"].items():
        assert entry == file_entry(saved / name), name


def test_own_files_per_rank(tmp_path):
    """Rank 0 lists its shard and RNG file and the shared files; another rank only its own (the
    shard of its save rank, the RNG file of its rank)."""
    from megatron_vpmoe.training.checkpoint import _own_files

    names = ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__12_0.distcp", ".metadata", "trainer_state.json",
             "config.yaml", "rng/rank_00000.safetensors", "rng/rank_00001.safetensors", "rng/rank_00002.safetensors",
             "stray.txt"]
    (tmp_path / "rng").mkdir()
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(bytes([i]) * (i + 1))
    assert set(_own_files(tmp_path, 0, 0)) == {"__0_0.distcp", "rng/rank_00000.safetensors", ".metadata",
                                               "trainer_state.json", "config.yaml"}
    assert set(_own_files(tmp_path, 1, 1)) == {"__1_0.distcp", "rng/rank_00001.safetensors"}
    assert set(_own_files(tmp_path, 2, 1)) == {"__1_0.distcp", "rng/rank_00002.safetensors"}  # async group rank
    assert _own_files(tmp_path, 1, 1)["__1_0.distcp"]["size"] == 2


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_editing_any_listed_file_is_refused_naming_it(saved, name):
    from megatron_vpmoe.training.checkpoint import check_integrity
    from megatron_vpmoe.training.checkpoint_manifest import DamagedCheckpointError

    path = saved / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit: only the hash can tell
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpointError, match="sha256 differs") as err:
        check_integrity(saved, distributed=False)
    assert str(path) in str(err.value)
    os.truncate(path, len(data) - 1)
    with pytest.raises(DamagedCheckpointError, match="the manifest says"):
        check_integrity(saved, distributed=False)


def test_removed_file_is_refused(saved):
    from megatron_vpmoe.training.checkpoint import check_integrity
    from megatron_vpmoe.training.checkpoint_manifest import DamagedCheckpointError

    (saved / "trainer_state.json").unlink()
    with pytest.raises(DamagedCheckpointError):
        check_integrity(saved, distributed=False)


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("write", ["torch_save", "raw_pickle"])
def test_pickled_rng_refusal_names_the_global_not_torchs_advice(tmp_path, write):
    from megatron_vpmoe.training.checkpoint_files import load_rng
    from megatron_vpmoe.utils.errors import InputError

    path = tmp_path / "rank_00000.pt"
    if write == "torch_save":
        torch.save({"python": _Payload()}, path)
    else:
        path.write_bytes(pickle.dumps({"python": _Payload()}))
    with pytest.raises(InputError) as err:
        load_rng(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "refusing to unpickle" in message
    assert "weights_only" not in message and "Re-running" not in message and "file an issue" not in message
    if write == "torch_save":
        assert "posix.system" in message or "os.system" in message
