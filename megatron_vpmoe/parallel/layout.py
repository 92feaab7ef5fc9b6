"""Arithmetic of a parallel layout: which layers a pipeline rank holds, how many parameters its shard has.

Pure functions of the config and the layout sizes (nothing is built), so they answer for the
6B design on any host and are checked against built shards (tests, ``benchmarks/scale.py``).
Layers are split into ``pp x vpp`` contiguous, balanced stages; rank ``r`` holds stages
``r, r + pp, ...``. Within a rank's layers: TP splits attention projections, sinks, dense and
shared-expert MLPs (column bias split, row bias not); EP splits routed experts; everything
else (embedding, head, norms, router, QK-norm, value-residual lambda, GRAPE-M, TPA's dim-factor
projection) is replicated.
"""

from __future__ import annotations

from typing import List

from megatron_vpmoe.config.schema import ModelConfig
from megatron_vpmoe.model.params import _mlp, _norm, attention_params, expert_params


def stage_layers(num_layers: int, num_stages: int, stage: int) -> List[int]:
    """Contiguous, balanced layer numbers of pipeline stage ``stage`` of ``num_stages``."""
    per, extra = divmod(num_layers, num_stages)
    start = stage * per + min(stage, extra)
    return list(range(start, start + per + (1 if stage < extra else 0)))


def rank_stages(pp: int, vpp: int, rank: int) -> List[int]:
    """The stage indices pipeline rank ``rank`` holds (its model chunks, in order)."""
    return [chunk * pp + rank for chunk in range(vpp)]


def rank_layers(num_layers: int, pp: int, vpp: int, rank: int) -> List[int]:
    """Every layer number held by pipeline rank ``rank`` (the union of its chunks)."""
    return [i for s in rank_stages(pp, vpp, rank) for i in stage_layers(num_layers, pp * vpp, s)]


def _tp_mlp(cfg: ModelConfig, ffn: int, tp: int) -> int:
    """One MLP's parameters on one TP rank (fc1 bias split, fc2 bias whole)."""
    n = _mlp(cfg, cfg.hidden_size, ffn)
    if not cfg.add_bias_linear:
        return n // tp
    return (n - cfg.hidden_size) // tp + cfg.hidden_size


def shard_parameter_count(cfg: ModelConfig, *, tp: int = 1, ep: int = 1, pp: int = 1, vpp: int = 1,
                          pp_rank: int = 0) -> int:
    """Parameters held by one rank of pipeline rank ``pp_rank`` (any TP/EP coordinate)."""
    h = cfg.hidden_size
    n = 0
    if pp_rank == 0:
        n += cfg.vocab_size * h
    if pp_rank == pp - 1:
        n += _norm(cfg, h) + (cfg.vocab_size * h if cfg.untie_embeddings_and_output_weights else 0)
    for layer in rank_layers(cfg.num_layers, pp, vpp if pp > 1 else 1, pp_rank):
        n += attention_params(cfg, layer, tp) + 2 * _norm(cfg, h)
        if cfg.is_moe_layer(layer):
            n += cfg.num_moe_experts * h  # router
            n += cfg.num_moe_experts // ep * expert_params(cfg)
            if cfg.moe_shared_expert_intermediate_size > 0:
                n += cfg.moe_num_shared_experts * _tp_mlp(cfg, cfg.moe_shared_expert_intermediate_size, tp)
        else:
            n += _tp_mlp(cfg, cfg.ffn_hidden_size, tp)
    return n
