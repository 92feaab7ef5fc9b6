"""Model FLOPs per token: matmuls only (embedding lookup excluded, LM head included), per layer and in total.

Forward FLOPs of a ``[m, k] @ [k, n]`` matmul are ``2 m k n``; training is 3 x forward
(backward = 2 x forward), the MFU convention, whatever recompute re-runs. Attention counts
the key positions a query really sees under the causal mask: ``t + 1`` for position ``t`` on
a global layer, ``min(t + 1, window)`` on a sliding-window one, averaged over the sequence.
MoE layers count the router, ``topk`` routed experts and the shared expert(s).
"""

from __future__ import annotations

from typing import Dict

from megatron_vpmoe.config.schema import ModelConfig


def mean_visible_keys(seq_length: int, window: int | None) -> float:
    """Average number of keys a query attends to under the causal (and window) mask."""
    s = seq_length
    if window is None or window >= s:
        return (s + 1) / 2
    return (window * (window + 1) / 2 + (s - window) * window) / s


def _mlp_flops(cfg: ModelConfig, ffn: int) -> float:
    up = 2 * ffn if cfg.activation == "swiglu" else ffn
    return 2.0 * cfg.hidden_size * up + 2.0 * ffn * cfg.hidden_size


def layer_forward_flops(cfg: ModelConfig, layer: int, seq_length: int) -> Dict[str, float]:
    """Forward FLOPs per token of one decoder layer, by matmul family."""
    h, d = cfg.hidden_size, cfg.kv_channels
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    window = None if cfg.is_global_layer(layer) else cfg.window_size
    out = {"qkv": 2.0 * h * (q + 2 * kv), "attention_core": 2.0 * 2.0 * q * mean_visible_keys(seq_length, window),
           "proj": 2.0 * q * h}
    if cfg.attention_kind(layer) == "tpa":  # factor projections, then Q/K/V expanded by matmuls
        ranks = cfg.tpa_q_rank + 2 * cfg.tpa_kv_rank
        v_rank = cfg.tpa_kv_rank * (2 if cfg.value_residual and layer > 0 else 1)  # mixed in factor form
        out["qkv"] = 2.0 * h * ranks * (cfg.num_attention_heads + d)
        out["tpa_expand"] = 2.0 * q * (cfg.tpa_q_rank + cfg.tpa_kv_rank + v_rank)
    if cfg.is_moe_layer(layer):
        out["router"] = 2.0 * h * cfg.num_moe_experts
        out["routed_experts"] = cfg.moe_router_topk * _mlp_flops(cfg, cfg.moe_ffn_hidden_size)
        if cfg.moe_shared_expert_intermediate_size > 0:
            out["shared_expert"] = cfg.moe_num_shared_experts * _mlp_flops(cfg, cfg.moe_shared_expert_intermediate_size)
    else:
        out["dense_mlp"] = _mlp_flops(cfg, cfg.ffn_hidden_size)
    return out


def head_forward_flops(cfg: ModelConfig) -> float:
    return 2.0 * cfg.hidden_size * cfg.vocab_size


def forward_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    layers = sum(sum(layer_forward_flops(cfg, i, seq_length).values()) for i in range(cfg.num_layers))
    return layers + head_forward_flops(cfg)


def training_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Model FLOPs of one trained token (forward + backward), the numerator of MFU."""
    return 3.0 * forward_flops_per_token(cfg, seq_length)

