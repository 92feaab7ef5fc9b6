"""A run's own checkpoint state: what the trainer saves beside model and optimizer, and how a run resumes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional

from megatron_vpmoe.training.checkpoint import CheckpointManager, latest_intact_checkpoint, resolve_checkpoint
from megatron_vpmoe.training.schedule import learning_rate
from megatron_vpmoe.utils.errors import VpmoeError


def trainer_state(cfg, step: int, world_size: int, dp_size: int, nonfinite_in_a_row: int) -> Dict[str, Any]:
    """``trainer_state.json`` of a checkpoint at ``step``: progress, batch, layout, schedule."""
    p = cfg.parallel
    return {
        "step": step,
        "consumed_samples": step * cfg.train.global_batch_size,
        "global_batch_size": cfg.train.global_batch_size,
        "nonfinite_in_a_row": nonfinite_in_a_row,
        "world_size": world_size,
        "layout": {"data": dp_size, "tensor": p.tensor, "pipeline": p.pipeline, "expert": p.expert},
        "schedule": {"kind": cfg.train.schedule.kind, "lr": learning_rate(max(0, step - 1), cfg.train)},
    }


def save_run_checkpoint(cfg, checkpoints: CheckpointManager, step: int, pm, optimizer,
                        state: Dict[str, Any]) -> Path:
    """Save model, optimizer, ``state`` and the resolved config as the checkpoint of ``step``."""
    from megatron_vpmoe.config import dump_config

    return checkpoints.save(step, pm, optimizer, state, config_text=dump_config(cfg))


def resume(cfg, checkpoints: CheckpointManager, pm, optimizer) -> Optional[Dict[str, Any]]:
    """Load ``checkpoint.load`` into ``pm``/``optimizer`` (``auto``: the newest intact checkpoint,
    damaged ones skipped with a warning; none yet: nothing); returns its trainer state, or None.
    A full resume (``load_optimizer``) must keep the global batch size (else data is replayed or skipped)."""
    ck = cfg.checkpoint
    if ck.load is None:
        return None
    if ck.load == "auto":
        path = latest_intact_checkpoint(cfg.checkpoint_dir)
        if path is None:
            return None
    else:
        path = resolve_checkpoint(ck.load)
    state = checkpoints.load(path, pm, optimizer, load_optimizer=ck.load_optimizer,
                             restore_rng_state=ck.load_optimizer,
                             model_config=dataclasses.asdict(cfg.model), verify=ck.load != "auto")
    if ck.load_optimizer and state.get("global_batch_size") not in (None, cfg.train.global_batch_size):
        raise VpmoeError(f"{path}: saved with train.global_batch_size={state['global_batch_size']}; resuming "
                         f"with a different global batch size would replay or skip data")
    return state
