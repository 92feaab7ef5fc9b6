"""The value-residual carrier: layer 0's values as one tensor (GQA heads or TPA factors) and their mix into later layers.

Layer 0 hands its raw values to every later layer (``v = l * v + (1 - l) * v0``) through one
tensor, ``v_first``, which also travels between pipeline stages. Its layout is layer 0's own:
GQA values ``[B, S, G, D]``, or TPA value factors packed as ``[B, S, R, H + D]`` (per rank: the
head factors ``a [B, S, H, R]`` transposed, already divided by ``R``, then the dim factors
``b [B, S, R, D]``), so the cache of a TPA layer keeps factors, never expanded values.

In factor form a mix is a concatenation along the rank: ``l * sum_r a_r b_r + (1 - l) *
sum_r a0_r b0_r`` has head factors ``[l * a, (1 - l) * a0]`` and dim factors ``[b, b0]``. GQA
values are factors too: rank ``G``, head factor of head ``h`` the one-hot of its group.
"""

from __future__ import annotations

from typing import Tuple

import torch

from megatron_vpmoe.config.schema import ModelConfig

Factors = Tuple[torch.Tensor, torch.Tensor]  # head factors [B, S, H, R], dim factors [B, S, R, D]


def first_values_shape(cfg: ModelConfig, tp: int = 1) -> Tuple[int, int]:
    """The trailing two dims of ``v_first`` on one tensor-parallel rank."""
    if cfg.attention_kind(0) == "tpa":
        return cfg.tpa_kv_rank, cfg.num_attention_heads // tp + cfg.kv_channels
    return cfg.num_query_groups // tp, cfg.kv_channels


def pack(factors: Factors) -> torch.Tensor:
    a, b = factors
    return torch.cat([a.transpose(-1, -2), b], dim=-1)


def group_factors(v: torch.Tensor, heads: int) -> Factors:
    """GQA values ``[B, S, G, D]`` as factors: head ``h``'s head factor is the one-hot of its group."""
    bsz, s, g, _ = v.shape
    onehot = torch.eye(g, dtype=v.dtype, device=v.device).repeat_interleave(heads // g, dim=0)
    return onehot.expand(bsz, s, heads, g), v


def unpack(v_first: torch.Tensor, cfg: ModelConfig, heads: int) -> Factors:
    """``v_first`` (either layout) as factors for ``heads`` local heads."""
    if cfg.attention_kind(0) == "tpa":
        return v_first[..., :heads].transpose(-1, -2), v_first[..., heads:]
    return group_factors(v_first, heads)


def mix(lam: torch.Tensor, own: Factors, first: Factors) -> Factors:
    """``lam * own + (1 - lam) * first`` in factor form (ranks concatenated)."""
    return (torch.cat([lam * own[0], (1.0 - lam) * first[0]], dim=-1),
            torch.cat([own[1], first[1].to(own[1].dtype)], dim=-2))


def expand(factors: Factors) -> torch.Tensor:
    """``sum_r a_r (x) b_r``: ``[B, S, H, R] @ [B, S, R, D] -> [B, S, H, D]`` (a batched matmul)."""
    a, b = factors
    return torch.matmul(a, b.to(a.dtype))
