"""Checks a launcher runs before it starts any rank: what the trainer refuses at start that needs no model.

A config error found here is printed once, in one line, with exit 2, in a second, instead of
once per rank after every rank has imported torch and megatron-core (half a minute on CPU).
Launchers call :func:`check_before_launch` with the world size they are about to start.
"""

from __future__ import annotations

from megatron_vpmoe.config.startup import check_world_layout


def check_before_launch(cfg, world_size: int, *, check_paths: bool = True) -> int:
    """Raise the trainer's own :class:`ConfigError`/:class:`InputError` for ``cfg`` on
    ``world_size`` ranks; return the data-parallel size. Checked: the layout against the model
    and the ranks and the global batch against micro-batch x data-parallel size
    (:func:`~megatron_vpmoe.config.startup.check_world_layout`), and (with
    ``check_paths``; off for paths that exist only where the job runs) that the tokenizer loads
    and fits ``model.vocab_size`` and every ``data.blend`` shard is there and intact."""
    data_parallel = check_world_layout(cfg, world_size)  # the trainer's own start-up check
    if check_paths:
        if cfg.data.tokenizer:
            from megatron_vpmoe.tokenizers.loader import load_for_model

            load_for_model(cfg.data.tokenizer, cfg.model.vocab_size)
        if not cfg.data.mock:
            from megatron_vpmoe.data.dataset import checked_blend

            checked_blend(cfg.data)
    return data_parallel
