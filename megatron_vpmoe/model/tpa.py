"""Tensor product attention (TPA, arXiv 2501.06425) for sliding-window layers, caching factors only.

For token ``x`` and head ``h``: ``Q[h] = (1/R_Q) sum_r a^Q_r(x)[h] * b^Q_r(x)``, and the same
for keys and values with rank ``R_K = R_V = tpa_kv_rank``: head factors ``a_r(x) in R^heads``
and dim factors ``b_r(x) in R^D`` are linear in ``x``. QK-norm and the positions (RoPE or
GRAPE-M, both linear maps of the head dimension) act on the dim factors, so the cache holds
rotated key factors and value factors (``(R_K + R_V') (heads + D)`` numbers per token, ``R_V'``
the value rank after the value-residual mix, see ``model/values.py``) and the keys and values
are expanded from them at each step by a batched matmul.

Parameters: ``linear_a`` (column-parallel: rows per head, ``R_Q`` query, ``R_K`` key, ``R_V``
value head-factor rows, so a TP split gives each rank whole heads), ``linear_b`` (the dim
factors ``[R_Q q | R_K k | R_V v]`` x ``D`` rows, whole on every TP rank), then the shared
``linear_proj``, QK-norm, sinks, value lambda and positions of :class:`AttentionBase`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_vpmoe.config.schema import ModelConfig
from megatron_vpmoe.model import values
from megatron_vpmoe.model.layers import AttentionBase, KVCache, LinearSpec


class TensorProductAttention(AttentionBase):
    """TPA with sliding window, sink, QK-norm on the dim factors and value residual in factor form."""

    def __init__(self, cfg: ModelConfig, layer_number: int, spec: LinearSpec):
        super().__init__(cfg, layer_number, spec)
        self.rq, self.rk = cfg.tpa_q_rank, cfg.tpa_kv_rank
        ranks = self.rq + 2 * self.rk
        bias = cfg.add_bias_linear
        self.linear_a = spec.column(cfg.hidden_size, cfg.num_attention_heads * ranks, bias)
        self.linear_b = spec.replicated(cfg.hidden_size, ranks * cfg.kv_channels, bias)
        self.mark_partial_grads(spec.tp_size, self.linear_b.parameters())

    def factors(self, x: torch.Tensor) -> Tuple[values.Factors, values.Factors, values.Factors]:
        """``x [B, S, hidden]`` -> query, key, value factors ``(a [B, S, H, R] / R, b [B, S, R, D])``."""
        bsz, s, _ = x.shape
        rq, rk = self.rq, self.rk
        a = self.linear_a(x).view(bsz, s, self.heads, rq + 2 * rk)
        b = self.linear_b(x).view(bsz, s, rq + 2 * rk, self.head_dim)
        cuts = ((0, rq), (rq, rq + rk), (rq + rk, rq + 2 * rk))
        return tuple((a[..., lo:hi] / (hi - lo), b[:, :, lo:hi]) for lo, hi in cuts)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, v_first: Optional[torch.Tensor],
                cache: Optional[KVCache] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x [B, S, H]`` -> (output ``[B, S, H]``, this layer's raw value factors packed, ``[B, S, R_V, heads + D]``)."""
        (aq, bq), (ak, bk), val = self.factors(x)
        raw = values.pack(val)
        if self.mix_values:
            if v_first is None:
                raise ValueError(f"layer {self.layer_number} needs layer 0's values (value residual)")
            val = values.mix(self.value_lambda, val, values.unpack(v_first, self.cfg, self.heads))
        if self.cfg.qk_layernorm:
            bq, bk = self.q_norm(bq), self.k_norm(bk)
        bq, bk = self.position_encode(bq, positions), self.position_encode(bk, positions)
        if cache is not None:
            ak, bk, *val = cache.update(self.layer_number, (ak, bk, *val), self.window)
        q = values.expand((aq, bq))
        k = values.expand((ak, bk))
        return self.attend(q, k, values.expand(val), cache), raw
