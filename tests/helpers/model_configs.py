"""Tiny model configs and a fixed global batch shared by the model, parallel and precision tests."""

from __future__ import annotations

from dataclasses import replace

import torch

from megatron_vpmoe.config.schema import ModelConfig

SEED = 7  # the parallel tests' model seed


def tiny_model_cfg(**over) -> ModelConfig:
    """The single-process tests' tiny VPMoE (8 experts, grouped routing); ``over`` replaces fields."""
    base = dict(vocab_size=97, hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=2,
                kv_channels=8, ffn_hidden_size=64, window_size=3, local_global_pattern=[1, 1],
                num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=16,
                moe_shared_expert_intermediate_size=16, moe_router_num_groups=4,
                moe_router_group_topk=2, init_method_std=0.1)
    base.update(over)
    return ModelConfig(**base)


def tiny_parallel_cfg() -> ModelConfig:
    # sliding + global layers, 1 dense + 2 MoE layers, a shared expert, biases on
    return ModelConfig(vocab_size=61, hidden_size=16, num_layers=3, num_attention_heads=4,
                       num_query_groups=2, kv_channels=8, ffn_hidden_size=32, window_size=3,
                       local_global_pattern=[1, 1], num_moe_experts=4, moe_router_topk=2,
                       moe_ffn_hidden_size=8, moe_shared_expert_intermediate_size=8,
                       moe_router_num_groups=2, moe_router_group_topk=2, add_bias_linear=True,
                       moe_aux_loss_coeff=0.01, init_method_std=0.2)


def locked_parallel_cfg() -> ModelConfig:
    """The locked attention (issue 24) at tiny size: 3 TPA+GRAPE-M local layers, 1 GQA+ALiBi global."""
    return replace(tiny_parallel_cfg(), num_layers=4, local_global_pattern=[3, 1], moe_aux_loss_coeff=0.0,
                   local_attention="tpa", tpa_q_rank=3, tpa_kv_rank=2, local_position="grape_m",
                   grape_m_learnable_basis=True, global_position="alibi")


def global_batch(cfg, n_seq=4, seq=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (n_seq, seq), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (n_seq, seq), generator=g)
    labels[0, :2] = -100
    return ids, labels
