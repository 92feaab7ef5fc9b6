"""Triton FlashAttention-style causal attention with sliding window, per-head sink and GQA.

Semantics of ``kernels.reference.attention``: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``,
queries are the last ``Sq`` of ``Sk`` positions, query ``i`` sees keys ``i - w < j <= i``, and the
sink logit of a head joins the softmax denominator without a value.

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
def _attn_fwd(q_ptr, k_ptr, v_ptr, sink_ptr, o_ptr, lse_ptr,
              sqb, sqs, sqh, skb, sks, skh, sob, sos, soh,
              n_q, n_k, n_heads, rep, window, scale,
              HAS_SINK: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // rep
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < n_q
    qpos = (n_k - n_q) + offs_m
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + offs_m[:, None] * sqs + h * sqh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    k_base = k_ptr + b.to(tl.int64) * skb + hk * skh
    v_base = v_ptr + b.to(tl.int64) * skb + hk * skh
    if HAS_SINK:
        sink = tl.load(sink_ptr + h).to(tl.float32)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = tl.maximum((n_k - n_q) + start_m - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum((n_k - n_q) + start_m + BLOCK_M, n_k)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_k
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(DOT_DTYPE)
        v = tl.load(v_base + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = (offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] > qpos[:, None] - window) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)  # only padding rows past the last query see no key
    out = acc / l_i[:, None]
    tl.store(o_ptr + b.to(tl.int64) * sob + offs_m[:, None] * sos + h * soh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * n_q + offs_m, m_i + tl.log(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                   sqb, sqs, sqh, skb, sks, skh,
                   n_q, n_k, n_heads, n_kv_heads, rep, window, scale,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < n_k
    kv_mask = n_ok[:, None] & d_ok[None, :]
    kv_offs = b.to(tl.int64) * skb + offs_n[:, None] * sks + hk * skh + offs_d[None, :]
    k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
    v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0).to(DOT_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query indices m that can see these keys: start_n <= pos(m) < start_n + BLOCK_N + window - 1.
    lo = tl.maximum(start_n - (n_k - n_q), 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.minimum(start_n + BLOCK_N - 1 + window - (n_k - n_q), n_q)
    for r in range(0, rep):
        h = hk * rep + r
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < n_q
            qpos = (n_k - n_q) + offs_m
            q_offs = b.to(tl.int64) * sqb + offs_m[:, None] * sqs + h * sqh + offs_d[None, :]
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0).to(DOT_DTYPE)
            do = tl.load(do_ptr + q_offs, mask=q_mask, other=0.0).to(DOT_DTYPE)
            row = (b * n_heads + h).to(tl.int64) * n_q + offs_m
            lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0)
            delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            visible = (offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] > qpos[:, None] - window) \
                & n_ok[None, :] & m_ok[:, None]
            p = tl.exp(tl.where(visible, s - lse[:, None], float("-inf")))
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(dk_ptr + kv_offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                 sqb, sqs, sqh, skb, sks, skh,
                 n_q, n_k, n_heads, rep, window, scale,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // rep
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < n_q
    qpos = (n_k - n_q) + offs_m
    q_offs = b.to(tl.int64) * sqb + offs_m[:, None] * sqs + h * sqh + offs_d[None, :]
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0).to(DOT_DTYPE)
    do = tl.load(do_ptr + q_offs, mask=q_mask, other=0.0).to(DOT_DTYPE)
    row = bh.to(tl.int64) * n_q + offs_m
    lse = tl.load(lse_ptr + row, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * skb + hk * skh
    v_base = v_ptr + b.to(tl.int64) * skb + hk * skh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = tl.maximum((n_k - n_q) + start_m - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum((n_k - n_q) + start_m + BLOCK_M, n_k)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_k
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(DOT_DTYPE)
        v = tl.load(v_base + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = (offs_n[None, :] <= qpos[:, None]) & (offs_n[None, :] > qpos[:, None] - window) \
            & n_ok[None, :] & m_ok[:, None]
        p = tl.exp(tl.where(visible, s - lse[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(dq_ptr + q_offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


def _dot_config(t: torch.Tensor) -> dict:
    """fp32 inputs keep full fp32 products (no TF32) so results match the reference; 16-bit
    inputs use 16-bit tensor-core products on GPU. Off-GPU (the Triton interpreter, whose 16-bit
    ``tl.dot`` is wrong in Triton 3.x) the products are computed in fp32."""
    if t.dtype == torch.float32 or not t.is_cuda:
        return {"PRECISION": "ieee", "DOT_DTYPE": tl.float32}
    return {"PRECISION": "tf32", "DOT_DTYPE": tl.bfloat16 if t.dtype == torch.bfloat16 else tl.float16}


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, window, scale):
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
        if o.numel():
            _attn_fwd[(triton.cdiv(sq, BLOCK_M), b * hq)](
                q, k, v, sink_arg, o, lse, *q.stride()[:3], *k.stride()[:3], *o.stride()[:3],
                sq, sk, hq, hq // hkv, win, scale, HAS_SINK=has_sink, D=d, BLOCK_D=block_d,
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **_dot_config(q))
        ctx.save_for_backward(q, k, v, o, lse, sinks if has_sink else None)
        ctx.window, ctx.scale, ctx.has_sink = win, scale, has_sink
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sinks = ctx.saved_tensors
        b, sq, hq, d = q.shape
        sk, hkv = k.shape[1], k.shape[2]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, Hq, Sq]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        block_d = max(16, triton.next_power_of_2(d))
        common = dict(D=d, BLOCK_D=block_d, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **_dot_config(q))
        if q.numel():
            _attn_bwd_dkdv[(triton.cdiv(sk, BLOCK_N), b * hkv)](
                q, k, v, do, lse, delta, dk, dv, *q.stride()[:3], *k.stride()[:3],
                sq, sk, hq, hkv, hq // hkv, ctx.window, ctx.scale, **common)
            _attn_bwd_dq[(triton.cdiv(sq, BLOCK_M), b * hq)](
                q, k, v, do, lse, delta, dq, *q.stride()[:3], *k.stride()[:3],
                sq, sk, hq, hq // hkv, ctx.window, ctx.scale, **common)
        else:
            dk.zero_()
            dv.zero_()
        dsinks = None
        if ctx.has_sink:
            p_sink = torch.exp(sinks.float().view(1, hq, 1) - lse)
            dsinks = (-(p_sink * delta).sum(dim=(0, 2))).to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None


def attention(q, k, v, sinks=None, window=None, scale=None):
    """Causal (sliding-window) attention with per-head sinks and GQA; differentiable in q, k, v, sinks."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _Attention.apply(q, k, v, sinks, window, float(scale))
