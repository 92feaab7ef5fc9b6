"""Shared helpers of the training tests (no tests here): a byte-level text dataset, a tiny
config, and entry points that subprocess / multi-process tests run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from megatron_vpmoe.utils.paths import data_dir

SHAKESPEARE = data_dir() / "corpora" / "tinyshakespeare.txt"  # ../shared/data's, or the embedded default's


class ByteTokenizer:
    """Bytes as token ids (0..255); every token is one UTF-8 byte."""

    vocab_size = 256
    eod_id = 0
    pad_id = 0

    def token_byte_lengths(self):
        return [1] * 256


class ByteWindows(torch.utils.data.Dataset):
    """Consecutive ``seq_length + 1`` byte windows of a text file, as the data package's items.

    ``roles`` cycles a per-sample loss-mask pattern for tests of the role-aware objective.
    """

    def __init__(self, path, seq_length: int, *, offset: int = 0, limit: int | None = None, roles=None):
        data = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
        self.data = data[offset: offset + limit] if limit else data[offset:]
        self.seq_length = seq_length
        self.roles = roles

    def __len__(self):
        return (len(self.data) - 1) // self.seq_length

    def __getitem__(self, i):
        s = self.seq_length
        chunk = torch.from_numpy(self.data[i * s: i * s + s + 1].astype(np.int64))
        mask = torch.full((s,), 3, dtype=torch.uint8)
        if self.roles is not None:
            mask = torch.as_tensor(self.roles[i % len(self.roles)], dtype=torch.uint8)
        return {"tokens": chunk[:-1], "labels": chunk[1:], "loss_mask": mask,
                "position_ids": torch.arange(s)}


TINY_OVERRIDES = {
    "model": {"vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 2,
              "num_query_groups": 1, "kv_channels": 16, "ffn_hidden_size": 64, "window_size": 16,
              "local_global_pattern": [1, 1], "moe_first_k_dense": 1, "num_moe_experts": 4,
              "moe_router_topk": 2, "moe_ffn_hidden_size": 32, "moe_shared_expert_intermediate_size": 32,
              "moe_router_num_groups": 1, "moe_router_group_topk": 1, "moe_router_bias_update_rate": 0.01},
    "data": {"mock": True, "seq_length": 32},
    "train": {"steps": 20, "global_batch_size": 4, "micro_batch_size": 1, "precision": "fp32",
              "optimizer": {"lr": 3e-3, "min_lr": 3e-4}, "schedule": {"kind": "cosine", "warmup_steps": 2}},
    "checkpoint": {"interval": 0, "keep_last": 3},
    "log": {"progress_bar": False},
}


def tiny_config(run_dir, **sections):
    """The tiny test config under ``run_dir``; ``sections`` override (nested dicts merged)."""
    import copy

    from megatron_vpmoe.config import config_from_dict

    values = copy.deepcopy(TINY_OVERRIDES)
    values["run"] = {"dir": str(run_dir), "seed": 7}
    for section, items in sections.items():
        values.setdefault(section, {})
        for key, value in items.items():
            if isinstance(value, dict) and isinstance(values[section].get(key), dict):
                values[section][key].update(value)
            else:
                values[section][key] = value
    return config_from_dict(values)


def datasets_for(cfg):
    seq = cfg.data.seq_length
    return (ByteWindows(SHAKESPEARE, seq, limit=400_000),
            ByteWindows(SHAKESPEARE, seq, offset=1_000_000, limit=20_000))


def run_training(cfg, quiet: bool = True, before_publish=None) -> int:
    """Train ``cfg`` on the byte windows; ``before_publish(step, tmp)`` is the checkpoint manager's hook."""
    from megatron_vpmoe.training.trainer import Trainer

    trainer = Trainer(cfg, datasets=datasets_for(cfg), tokenizer=ByteTokenizer(), quiet=quiet)
    trainer.checkpoints.before_publish = before_publish
    return trainer.run()


def pause_save(at_step: int, seconds: float):
    """A ``before_publish`` hook: a synchronous save of ``at_step`` writes ``PAUSED`` into its temp
    dir and sleeps ``seconds`` before the rename (so a test can kill -9 the process mid-save)."""
    import time

    def hook(step, tmp):
        if step == at_step:
            (Path(tmp) / "PAUSED").write_text("test hook\n")
            time.sleep(seconds)

    return hook


def read_metrics(run_dir, kind="train"):
    import json

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def main(argv=None):
    """``python tests/helpers/train_support.py RUN_DIR [--pause-save STEP:SECONDS] [section.key=value ...]``:
    train the tiny config (a subprocess target for the preemption and kill -9 tests; ``--pause-save``:
    :func:`pause_save`). Exits with the trainer's code."""
    import yaml

    from megatron_vpmoe.config import apply_overrides, config_from_dict

    argv = list(sys.argv[1:] if argv is None else argv)
    hook = None
    if "--pause-save" in argv:
        at = argv.index("--pause-save")
        step, seconds = argv[at + 1].split(":")
        hook = pause_save(int(step), float(seconds))
        del argv[at:at + 2]
    cfg = tiny_config(argv[0])
    from megatron_vpmoe.config import config_to_dict

    values = apply_overrides(config_to_dict(cfg), argv[1:])
    cfg = config_from_dict(yaml.safe_load(yaml.safe_dump(values)))
    return run_training(cfg, quiet=False, before_publish=hook)


if __name__ == "__main__":
    sys.exit(main())
