"""Native checkpoint access for conversion: stream model tensors out of a DCP checkpoint in
groups, and write a native checkpoint from tensors.

Reading needs no process group and no particular world size: DCP stores every shard with its
global offset, so a checkpoint saved at any TP/EP/PP/DP layout reads the same here; the
manifest is verified and nothing is unpickled beyond DCP metadata's allow-list. Tensors are
loaded a group at a time (``max_bytes`` each), so converting never holds the whole model twice.
Writing goes through the trainer's :class:`CheckpointManager`, so the result has exactly the
layout ``vpmoe train`` resumes from and ``vpmoe eval`` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

from megatron_vpmoe.utils.errors import InputError

PREFIX = "model."


def model_tensor_metadata(ckpt: Path) -> Dict[str, Tuple[torch.Size, torch.dtype]]:
    """``{state-dict key: (global shape, dtype)}`` of the model tensors of a DCP checkpoint."""
    from megatron_vpmoe.training.checkpoint import check_integrity
    from megatron_vpmoe.training.checkpoint_files import read_metadata

    check_integrity(ckpt, distributed=False)
    try:
        metadata = read_metadata(ckpt)
    except OSError as err:
        raise InputError(f"{ckpt}: cannot read DCP metadata ({err})") from None
    out = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith(PREFIX) and hasattr(meta, "size"):
            out[key[len(PREFIX):]] = (meta.size, meta.properties.dtype)
    if not out:
        raise InputError(f"{ckpt}: holds no model tensors")
    return out


def group_by_bytes(meta: Dict[str, Tuple[torch.Size, torch.dtype]], max_bytes: int,
                   itemsize: Dict[str, int]) -> List[List[str]]:
    """Consecutive keys packed into groups of at most ``max_bytes`` (a bigger tensor is alone)."""
    groups: List[List[str]] = [[]]
    size = 0
    for key, (shape, _) in meta.items():
        n = int(torch.Size(shape).numel()) * itemsize[key]
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    return [g for g in groups if g]


def iter_tensor_groups(ckpt: Path, groups: List[List[str]]) -> Iterator[Dict[str, torch.Tensor]]:
    """Load each group of keys from the checkpoint (CPU, no process group), one at a time."""
    from megatron_vpmoe.training.checkpoint import load_tensors

    meta = model_tensor_metadata(ckpt)
    for keys in groups:
        yield load_tensors(ckpt, {k: torch.empty(meta[k][0], dtype=meta[k][1]) for k in keys})


def write_native_checkpoint(root: Path, model, step: int, config_text: str, source: str) -> Path:
    """Save ``model`` (a ``VpmoeModel``) as checkpoint ``step`` under ``root`` with the trainer's
    checkpoint manager (no optimizer state)."""
    from megatron_vpmoe.training.checkpoint import CheckpointManager

    manager = CheckpointManager(root, keep_last=0)
    return manager.save(step, model, optimizer=[], trainer_state={"converted_from": source, "consumed_samples": 0},
                        config_text=config_text)
