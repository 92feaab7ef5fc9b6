"""Triton FlashAttention-style causal attention with sliding window, per-head sink and GQA.

Semantics of ``kernels.reference.attention``: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``,
queries are the last ``Sq`` of ``Sk`` positions, query ``i`` sees keys ``i - w < j <= i``, the
sink logit of a head joins the softmax denominator without a value, and the optional ALiBi slope
``m_h`` of a head adds ``-m_h (i - j)`` to each scaled score (a fixed bias: no gradient).

Why a custom kernel rather than ``flex_attention``: flex_attention expresses the window with a
block mask, but the sink is a denominator term that is not a score of any key, so it would need
an extra fake key column (and its gradient) per head. Here the sink simply starts the online
softmax: the running max is initialised to the sink and the running sum to 1, which costs nothing
and gives ``d sink = -sum_rows exp(sink - lse) * rowsum(dO * O)`` from the saved ``lse``.

Kernels (fp32 accumulation, key/query blocks outside the window are skipped):
- forward: grid (query blocks, B*Hq) -> ``O`` and ``lse`` (log of the full denominator);
- backward dK/dV: grid (key blocks, B*Hkv), each program loops over the ``Hq/Hkv`` query heads
  that share its KV head (no atomics);
- backward dQ: grid (query blocks, B*Hq).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_M = 32
BLOCK_N = 32


@triton.jit
def _load_tile(base, rows, row_stride, offs_d, row_ok, d_ok, DOT_DTYPE: tl.constexpr):
    """A ``[rows, D]`` tile of one head (zeros outside), cast to the matmul dtype."""
    return tl.load(base + rows[:, None] * row_stride + offs_d[None, :],
                   mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)


@triton.jit
def _load_kv(k_base, v_base, offs_n, row_stride, offs_d, n_k, d_ok, DOT_DTYPE: tl.constexpr):
    """The K and V tiles of keys ``offs_n`` (zeros past ``n_k``)."""
    n_ok = offs_n < n_k
    return (_load_tile(k_base, offs_n, row_stride, offs_d, n_ok, d_ok, DOT_DTYPE),
            _load_tile(v_base, offs_n, row_stride, offs_d, n_ok, d_ok, DOT_DTYPE))


@triton.jit
def _visible(qpos, offs_n, n_k, window):
    """Causal sliding-window mask ``qpos - window < key <= qpos`` of a ``[M, N]`` tile."""
    return (offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] > qpos[:, None] - window) \
        & (offs_n < n_k)[None, :]


@triton.jit
def _biased(s, qpos, offs_n, slope):
    """Scores plus the ALiBi distance bias ``-slope * (i - j)`` (slope 0: no bias)."""
    return s - slope * (qpos[:, None] - offs_n[None, :]).to(tl.float32)


@triton.jit
def _key_blocks(start_m, n_q, n_k, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[lo, hi)``: the key range a query block can see, ``lo`` aligned to ``BLOCK_N``."""
    lo = tl.maximum((n_k - n_q) + start_m - window + 1, 0)
    return (lo // BLOCK_N) * BLOCK_N, tl.minimum((n_k - n_q) + start_m + BLOCK_M, n_k)


@triton.jit
def _tile_probs_and_dscores(q, k, v, do, lse, delta, qpos, offs_n, n_k, window, scale, slope,
                            PRECISION: tl.constexpr):
    """Backward of one tile: probabilities ``p`` from the saved ``lse`` and ``ds = p * (dO V^T - delta)``.

    Padding query rows have ``q = dO = 0`` and ``lse = delta = 0``, so their ``ds`` and their
    ``p^T dO`` contribution are zero."""
    s = _biased(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, qpos, offs_n, slope)
    p = tl.exp(tl.where(_visible(qpos, offs_n, n_k, window), s - lse[:, None], float("-inf")))
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _query_block(n_q, n_heads, rep, sqb, sqh, skb, skh, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """Decode a (query block, batch*head) program: offsets, masks and the q / kv head bases."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return (start_m, bh, h, offs_m, offs_d, offs_d < D, offs_m < n_q, b * sqb + h * sqh,
            b * skb + (h // rep) * skh)


@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, sink_ptr, slope_ptr, o_ptr, lse_ptr,
              sqb, sqs, sqh, skb, sks, skh, sob, sos, soh,
              n_q, n_k, n_heads, rep, window, scale,
              HAS_SINK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
              DOT_DTYPE: tl.constexpr):
    start_m, bh, h, offs_m, offs_d, d_ok, m_ok, q_base, kv_base = _query_block(
        n_q, n_heads, rep, sqb, sqh, skb, skh, D, BLOCK_D, BLOCK_M)
    qpos = (n_k - n_q) + offs_m
    q = _load_tile(q_ptr + q_base, offs_m, sqs, offs_d, m_ok, d_ok, DOT_DTYPE)
    k_base = k_ptr + kv_base
    v_base = v_ptr + kv_base
    slope = tl.load(slope_ptr + h).to(tl.float32)
    if HAS_SINK:  # the sink starts the online softmax: running max = sink, running sum = 1
        sink = tl.load(sink_ptr + h).to(tl.float32)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_blocks(start_m, n_q, n_k, window, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_base, v_base, offs_n, sks, offs_d, n_k, d_ok, DOT_DTYPE)
        s = _biased(tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale, qpos, offs_n, slope)
        s = tl.where(_visible(qpos, offs_n, n_k, window), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)  # only padding rows past the last query see no key
    out = acc / l_i[:, None]
    o_base = (bh // n_heads).to(tl.int64) * sob + h * soh
    tl.store(o_ptr + o_base + offs_m[:, None] * sos + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * n_q + offs_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, slope_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                   sqb, sqs, sqh, skb, sks, skh,
                   n_q, n_k, n_heads, n_kv_heads, rep, window, scale,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = (bhk // n_kv_heads).to(tl.int64)
    hk = bhk % n_kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < n_k
    kv_base = b * skb + hk * skh
    k, v = _load_kv(k_ptr + kv_base, v_ptr + kv_base, offs_n, sks, offs_d, n_k, d_ok, DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query indices m that can see these keys: start_n <= pos(m) < start_n + BLOCK_N + window - 1.
    lo = tl.maximum(start_n - (n_k - n_q), 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.minimum(start_n + BLOCK_N - 1 + window - (n_k - n_q), n_q)
    for r in range(0, rep):  # the query heads sharing this KV head
        h = hk * rep + r
        q_base = b * sqb + h * sqh
        slope = tl.load(slope_ptr + h).to(tl.float32)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < n_q
            q = _load_tile(q_ptr + q_base, offs_m, sqs, offs_d, m_ok, d_ok, DOT_DTYPE)
            do = _load_tile(do_ptr + q_base, offs_m, sqs, offs_d, m_ok, d_ok, DOT_DTYPE)
            row = (b * n_heads + h) * n_q + offs_m
            lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0)
            delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
            p, ds = _tile_probs_and_dscores(q, k, v, do, lse, delta, (n_k - n_q) + offs_m, offs_n,
                                            n_k, window, scale, slope, PRECISION)
            dv += tl.dot(tl.trans(p.to(DOT_DTYPE)), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(DOT_DTYPE)), q, input_precision=PRECISION)
    kv_offs = kv_base + offs_n[:, None] * sks + offs_d[None, :]
    kv_mask = n_ok[:, None] & d_ok[None, :]
    tl.store(dk_ptr + kv_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, slope_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                 sqb, sqs, sqh, skb, sks, skh,
                 n_q, n_k, n_heads, rep, window, scale,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    start_m, bh, h, offs_m, offs_d, d_ok, m_ok, q_base, kv_base = _query_block(
        n_q, n_heads, rep, sqb, sqh, skb, skh, D, BLOCK_D, BLOCK_M)
    q = _load_tile(q_ptr + q_base, offs_m, sqs, offs_d, m_ok, d_ok, DOT_DTYPE)
    do = _load_tile(do_ptr + q_base, offs_m, sqs, offs_d, m_ok, d_ok, DOT_DTYPE)
    row = bh.to(tl.int64) * n_q + offs_m
    lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
    k_base = k_ptr + kv_base
    v_base = v_ptr + kv_base
    slope = tl.load(slope_ptr + h).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_blocks(start_m, n_q, n_k, window, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_base, v_base, offs_n, sks, offs_d, n_k, d_ok, DOT_DTYPE)
        _, ds = _tile_probs_and_dscores(q, k, v, do, lse, delta, (n_k - n_q) + offs_m, offs_n,
                                        n_k, window, scale, slope, PRECISION)
        dq += tl.dot(ds.to(DOT_DTYPE), k, input_precision=PRECISION)
    tl.store(dq_ptr + q_base + offs_m[:, None] * sqs + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _dot_config(t: torch.Tensor) -> dict:
    """fp32 inputs keep full fp32 products (no TF32) so results match the reference; 16-bit
    inputs use 16-bit tensor-core products on GPU. Off-GPU (the Triton interpreter, whose 16-bit
    ``tl.dot`` is wrong in Triton 3.x) the products are computed in fp32."""
    if t.dtype == torch.float32 or not t.is_cuda:
        return {"PRECISION": "ieee", "DOT_DTYPE": tl.float32}
    return {"PRECISION": "tf32", "DOT_DTYPE": tl.bfloat16 if t.dtype == torch.bfloat16 else tl.float16}


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, window, scale, alibi):
        b, sq, hq, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        if hq % hkv:
            raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
        if sq > sk:
            raise ValueError(f"{sq} queries but only {sk} keys")
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        win = sk + 1 if window is None else int(window)
        o = torch.empty_like(q)
        lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
        block_d = max(16, triton.next_power_of_2(d))
        has_sink = sinks is not None
        sink_arg = sinks.contiguous() if has_sink else lse
        slopes = (torch.zeros(hq, dtype=torch.float32, device=q.device) if alibi is None
                  else alibi.detach().float().contiguous())
        if o.numel():
            _attn_fwd[(triton.cdiv(sq, BLOCK_M), b * hq)](
                q, k, v, sink_arg, slopes, o, lse, *q.stride()[:3], *k.stride()[:3], *o.stride()[:3],
                sq, sk, hq, hq // hkv, win, scale, HAS_SINK=has_sink, D=d, BLOCK_D=block_d,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **_dot_config(q))
        ctx.save_for_backward(q, k, v, o, lse, slopes, sinks if has_sink else None)
        ctx.window, ctx.scale, ctx.has_sink = win, scale, has_sink
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, slopes, sinks = ctx.saved_tensors
        b, sq, hq, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, Hq, Sq]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        block_d = max(16, triton.next_power_of_2(d))
        common = dict(D=d, BLOCK_D=block_d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **_dot_config(q))
        if q.numel():
            _attn_bwd_dkdv[(triton.cdiv(sk, BLOCK_N), b * hkv)](
                q, k, v, slopes, do, lse, delta, dk, dv, *q.stride()[:3], *k.stride()[:3],
                sq, sk, hq, hkv, hq // hkv, ctx.window, ctx.scale, **common)
            _attn_bwd_dq[(triton.cdiv(sq, BLOCK_M), b * hq)](
                q, k, v, slopes, do, lse, delta, dq, *q.stride()[:3], *k.stride()[:3],
                sq, sk, hq, hq // hkv, ctx.window, ctx.scale, **common)
        else:
            dk.zero_()
            dv.zero_()
        dsinks = None
        if ctx.has_sink:
            p_sink = torch.exp(sinks.float().view(1, hq, 1) - lse)
            dsinks = (-(p_sink * delta).sum(dim=(0, 2))).to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None


def attention(q, k, v, sinks=None, window=None, scale=None, alibi=None):
    """Causal (sliding-window) attention with per-head sinks, GQA and an optional ALiBi bias
    (``alibi [Hq]`` slopes); differentiable in q, k, v, sinks."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _Attention.apply(q, k, v, sinks, window, float(scale), alibi)
