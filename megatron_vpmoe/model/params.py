"""Parameter accounting for a VPMoE config: total, active per token, embedding+head, per component.

Pure arithmetic on :class:`ModelConfig`, so it runs for the 6B design without building it.
The model's own modules must agree with it exactly (a test compares against
``sum(p.numel())`` of a built model); buffers such as the router's expert bias are not
parameters and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from megatron_vpmoe.config.schema import ModelConfig


def _norm(cfg: ModelConfig, width: int) -> int:
    return width * (2 if cfg.normalization == "LayerNorm" else 1)


def _mlp(cfg: ModelConfig, hidden: int, ffn: int) -> int:
    """One MLP: fc1 (two projections for SwiGLU) and fc2, with biases if configured."""
    up = 2 * ffn if cfg.activation == "swiglu" else ffn
    weights = hidden * up + ffn * hidden
    biases = (up + hidden) if cfg.add_bias_linear else 0
    return weights + biases


def attention_params(cfg: ModelConfig, layer_number: int, tp: int = 1) -> int:
    """One attention layer's parameters on one tensor-parallel rank (``tp = 1``: the whole layer).
    TP splits the head-sized projections and the sinks; TPA's dim-factor projection, the output
    bias, norms, lambda and GRAPE-M parameters are whole on every rank."""
    h, d, heads = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads
    q = heads * d
    if cfg.attention_kind(layer_number) == "tpa":
        ranks = cfg.tpa_q_rank + 2 * cfg.tpa_kv_rank
        split, whole = h * heads * ranks + q * h, h * ranks * d  # head factors + output | dim factors
        if cfg.add_bias_linear:
            split, whole = split + heads * ranks, whole + ranks * d + h
    else:
        kv = cfg.num_query_groups * d
        split, whole = h * (q + 2 * kv) + q * h, 0  # fused QKV projection + output projection
        if cfg.add_bias_linear:
            split, whole = split + q + 2 * kv, h
    if cfg.softmax_offset:
        split += heads
    n = split // tp + whole
    if cfg.qk_layernorm:
        n += 2 * _norm(cfg, d)
    if cfg.value_residual and layer_number > 0:
        n += 1  # the learnable mixing lambda
    if cfg.position_kind(layer_number) == "grape_m":
        n += (d // 2 if cfg.grape_m_learnable_freq else 0) + (d * d if cfg.grape_m_learnable_basis else 0)
    return n


def expert_params(cfg: ModelConfig) -> int:
    """One routed expert (ReLU^2 MLP of width moe_ffn_hidden_size)."""
    return _mlp(cfg, cfg.hidden_size, cfg.moe_ffn_hidden_size)


def shared_expert_params(cfg: ModelConfig) -> int:
    if cfg.moe_shared_expert_intermediate_size <= 0:
        return 0
    return cfg.moe_num_shared_experts * _mlp(cfg, cfg.hidden_size, cfg.moe_shared_expert_intermediate_size)


def router_params(cfg: ModelConfig) -> int:
    return cfg.num_moe_experts * cfg.hidden_size


@dataclass
class ParameterCounts:
    total: int
    active: int
    embedding_head: int
    components: Dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"total params: {self.total}",
            f"active params per token: {self.active}",
            f"embedding+head params: {self.embedding_head}",
            f"embedding+head share of active: {self.embedding_head / self.active:.1%}",
        ]
        out += [f"  {name}: {n}" for name, n in self.components.items()]
        return out


def count_parameters(cfg: ModelConfig) -> ParameterCounts:
    h, v = cfg.hidden_size, cfg.vocab_size
    embedding = v * h
    head = v * h if cfg.untie_embeddings_and_output_weights else 0
    comp = {
        "embedding": embedding,
        "output_layer": head,
        "attention": 0,
        "norms": _norm(cfg, h),  # final norm
        "dense_mlp": 0,
        "router": 0,
        "routed_experts": 0,
        "shared_experts": 0,
    }
    inactive = 0
    for layer in range(cfg.num_layers):
        comp["attention"] += attention_params(cfg, layer)
        comp["norms"] += 2 * _norm(cfg, h)  # pre-attention and pre-MLP
        if cfg.is_moe_layer(layer):
            comp["router"] += router_params(cfg)
            comp["routed_experts"] += cfg.num_moe_experts * expert_params(cfg)
            comp["shared_experts"] += shared_expert_params(cfg)
            inactive += (cfg.num_moe_experts - cfg.moe_router_topk) * expert_params(cfg)
        else:
            comp["dense_mlp"] += _mlp(cfg, h, cfg.ffn_hidden_size)
    total = sum(comp.values())
    return ParameterCounts(
        total=total, active=total - inactive, embedding_head=embedding + head, components=comp
    )
