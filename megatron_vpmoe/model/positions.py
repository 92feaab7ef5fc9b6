"""Position encodings of the attention layers: RoPE, GRAPE-M rotations and ALiBi (GRAPE-A) slopes.

GRAPE-M (multiplicative GRAPE, arXiv 2512.07805) rotates a query/key at position ``n`` by
``exp(n * sum_j w_j L_j)``, ``L_j`` the rank-2 skew generators of ``D/2`` orthogonal planes.
Here the planes are the column pairs ``(j, j + D/2)`` of an orthogonal basis ``P`` (rotate-half
layout) and ``w_j`` per-plane frequencies: ``G(n) = P R(n w) P^T``. RoPE is the special case
``P = I`` with ``w_j = base^(-2j/D)``, and it is the initialisation here (learnable frequencies
start at the RoPE spectrum, a learnable basis at ``P = I``), so an untrained GRAPE-M layer equals
the RoPE one exactly. Only ``R(n w) P^T x`` is applied: the trailing ``P`` cancels in every
query-key product, ``(G(m) q)^T G(n) k = (R(m w) P^T q)^T R(n w) P^T k``.
"""

from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn


def rope_frequencies(dim: int, base: float, device=None) -> torch.Tensor:
    """RoPE's ``inv_freq = base ** (-arange(0, D, 2) / D)`` (fp32, ``[D/2]``)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))


def _tables(positions: torch.Tensor, freq: torch.Tensor):
    """``cos, sin [B, S, 1, D]`` of ``positions [B, S] * freq [D/2]`` (fp32)."""
    angles = positions.to(torch.float32).unsqueeze(-1) * freq.float()  # [B, S, D/2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).unsqueeze(2)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).unsqueeze(2)
    return cos, sin


def _rotate_with(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    xf = x.float()
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """Rotate planes ``(j, j + D/2)`` of ``x [B, S, N, D]`` by ``positions [B, S] * freq [D/2]``
    (rotate-half layout, Megatron/HF); computed in fp32, returned in ``x``'s dtype."""
    return _rotate_with(x, *_tables(positions, freq))


class _RopeTables:
    """The last RoPE ``cos``/``sin`` tables, per ``(positions tensor, head dim, base)``: queries and
    keys of every layer of a forward rotate by the same positions, so the tables are built once
    per forward instead of twice per layer. The positions tensor is held, so its storage cannot be
    reused by another tensor while it is the key; its version counter catches in-place changes."""

    def __init__(self):
        self.entry = None  # (key, positions, tables), replaced whole (threads see one or the other)

    def get(self, positions: torch.Tensor, dim: int, base: float):
        if positions.requires_grad:  # never for integer positions; no caching of a graph
            return _tables(positions, rope_frequencies(dim, base, positions.device))
        key = (positions.data_ptr(), tuple(positions.shape), tuple(positions.stride()), positions._version,
               positions.dtype, positions.device, dim, float(base))
        entry = self.entry
        if entry is None or entry[0] != key:
            entry = (key, positions, _tables(positions, rope_frequencies(dim, base, positions.device)))
            self.entry = entry
        return entry[2]


_ROPE_TABLES = _RopeTables()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding, rotate-half layout (Megatron/HF): ``x [B, S, H, D]``, ``positions [B, S]``."""
    return _rotate_with(x, *_ROPE_TABLES.get(positions, x.shape[-1], base))


class GrapeM(nn.Module):
    """GRAPE-M for one layer: per-plane frequencies (learnable: ``freq_log_scale``, a log-scale on
    the RoPE spectrum, zero at init) and optionally a learnable orthogonal basis
    (``basis_skew``: ``P = matrix_exp(S - S^T)``, zero at init, so ``P = I``)."""

    def __init__(self, dim: int, base: float, learnable_freq: bool, learnable_basis: bool):
        super().__init__()
        if dim % 2:
            raise ValueError("GRAPE-M needs an even head dimension")
        self.register_buffer("rope_freq", rope_frequencies(dim, base), persistent=False)
        self.freq_log_scale = nn.Parameter(torch.zeros(dim // 2)) if learnable_freq else None
        self.basis_skew = nn.Parameter(torch.zeros(dim, dim)) if learnable_basis else None

    def frequencies(self) -> torch.Tensor:
        if self.freq_log_scale is None:
            return self.rope_freq
        return self.rope_freq * torch.exp(self.freq_log_scale.float())

    def basis(self) -> torch.Tensor:
        """The orthogonal ``P`` whose column pairs ``(j, j + D/2)`` span the rotation planes."""
        if self.basis_skew is None:
            return torch.eye(self.rope_freq.shape[0] * 2, device=self.rope_freq.device)
        s = self.basis_skew.float()
        return torch.linalg.matrix_exp(s - s.t())

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [B, S, N, D]`` -> ``R(n w) P^T x`` at each token's position ``n``."""
        if self.basis_skew is not None:
            x = (x.float() @ self.basis()).to(x.dtype)  # row vector x P = (P^T x)^T
        return rotate(x, positions, self.frequencies())


def alibi_slopes(heads: int) -> List[float]:
    """ALiBi's per-head slopes (Press et al.): ``2^(-8 i / n)``, ``i = 1..n`` for ``n`` a power of
    two; otherwise those of the largest power of two below ``n`` followed by every other slope
    of twice that power."""
    def geometric(n: int) -> List[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if heads & (heads - 1) == 0:
        return geometric(heads)
    low = 2 ** int(math.floor(math.log2(heads)))
    return geometric(low) + geometric(2 * low)[0::2][: heads - low]
