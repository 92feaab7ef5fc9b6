"""What the trainer refuses at start, checked from the config and the number of ranks alone (no model, no process group): the layout, the batch, the paths.

:func:`check_world_layout` is the trainer's own start-up check (``training/trainer.py`` calls it),
so a launcher that calls it for the layout it renders (``vpmoe launch slurm``, the experiment
runner) refuses exactly what the job would refuse after waiting in the queue.
:func:`check_paths` names the first file or directory the run reads that does not exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_vpmoe.utils.errors import ConfigError


def check_world_layout(cfg, world_size: int, batch: bool = True) -> int:
    """Raise the trainer's one-line :class:`ConfigError` if ``cfg`` cannot start on ``world_size``
    ranks (TP/EP/PP vs the model, sequence parallelism, world vs tensor x pipeline, expert vs data x
    tensor, and with ``batch`` global batch vs micro-batch x data-parallel); return the data-parallel
    size. The on-policy trainer, whose batches are its prompt groups, checks without ``batch``."""
    cfg.parallel.validate(cfg.model)
    if cfg.parallel.sequence_parallel:
        if cfg.data.seq_length % cfg.parallel.tensor:
            raise ConfigError(f"data.seq_length ({cfg.data.seq_length}) must be divisible by parallel.tensor "
                              f"({cfg.parallel.tensor}) to split the sequence", key="parallel.sequence_parallel")
        if cfg.train.transformer_impl == "transformer_engine":
            raise ConfigError("sequence parallelism runs with the local (megatron-core) linears, not "
                              "train.transformer_impl: transformer_engine", key="parallel.sequence_parallel")
    data = cfg.parallel.resolve_data(world_size)
    if batch:
        cfg.train.check_batch_layout(data)
    return data


def _resolve(path: str, base: Optional[Path]) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base is None else base / p


def check_paths(cfg, base: Optional[Path] = None) -> None:
    """Raise a :class:`ConfigError` naming the key of the first input that does not exist: the
    tokenizer directory, each ``data.blend`` prefix's ``.bin``/``.idx`` (unless ``data.mock``),
    an explicit ``checkpoint.load``. Relative paths are read from ``base`` (default: here)."""
    if cfg.data.tokenizer and not _resolve(cfg.data.tokenizer, base).is_dir():
        raise ConfigError(f"{cfg.data.tokenizer} does not exist (a tokenizer directory)", key="data.tokenizer")
    if not cfg.data.mock:
        for i, (_, prefix) in enumerate(cfg.data.blend):
            for suffix in (".bin", ".idx"):
                if not _resolve(f"{prefix}{suffix}", base).is_file():
                    raise ConfigError(f"{prefix}{suffix} does not exist (run 'vpmoe preprocess' first)",
                                      key=f"data.blend[{i}]")
    load = cfg.checkpoint.load
    if load not in (None, "auto") and not _resolve(load, base).exists():
        raise ConfigError(f"{load} does not exist", key="checkpoint.load")
