"""A served checkpoint root is named after its run (run.name, else the run directory), not "checkpoints"."""

from pathlib import Path

import torch

from megatron_vpmoe.config import dump_config, load_config
from megatron_vpmoe.convert.checkpoint_io import write_native_checkpoint
from megatron_vpmoe.inference.native import NativeBackend
from megatron_vpmoe.model import VpmoeModel
from megatron_vpmoe.tokenizers.train import train_bpe
from helpers.paths import ROOT


def _checkpoint_root(tmp_path: Path, *overrides: str) -> Path:
    train_bpe(["the quick brown fox jumps over the lazy dog. " * 50], 300).save(tmp_path / "tok")
    cfg = load_config(ROOT / "examples" / "configs" / "tiny-cpu.yaml",
                      ["model.vocab_size=512", f"data.tokenizer={tmp_path / 'tok'}", "model.num_layers=2",
                       f"run.dir={tmp_path / 'runs' / 'shakespeare-bpe'}", *overrides])
    torch.manual_seed(0)
    root = tmp_path / "runs" / "shakespeare-bpe" / "checkpoints"
    write_native_checkpoint(root, VpmoeModel(cfg.model), 3, dump_config(cfg), source="test")
    return root


def test_a_checkpoint_root_is_served_under_its_run_name(tmp_path):
    root = _checkpoint_root(tmp_path, "run.name=my-run")
    assert NativeBackend(str(root)).model_id == "my-run"
    assert NativeBackend(str(root), model_id="explicit").model_id == "explicit"


def test_without_run_name_the_run_directory_names_it(tmp_path):
    root = _checkpoint_root(tmp_path)
    assert NativeBackend(str(root)).model_id == "shakespeare-bpe"
