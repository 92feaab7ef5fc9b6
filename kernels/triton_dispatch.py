"""Triton token permute/unpermute for dropless MoE dispatch, semantics of ``kernels.reference.permute/unpermute``.

The expert sort (a stable argsort of the flat expert ids) stays in PyTorch; the kernels are
the row gather (``permute``) and the weighted combine (``unpermute``). Both directions are
written as gathers through the inverse permutation (each token owns exactly ``topk`` rows), so
no atomics are needed and results are deterministic:
- permute fwd: ``out[i] = hidden[order[i] // topk]``; bwd: ``dh[t] = sum_k dout[inv[t*topk+k]]``.
- unpermute fwd: ``out[t] = sum_k w[t,k] * y[inv[t*topk+k]]``;
  bwd: ``dy[inv[t*topk+k]] = w[t,k] * dout[t]``, ``dw[t,k] = <dout[t], y[inv[t*topk+k]]>``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_H = 256


@triton.jit
def _gather_rows(src_ptr, row_ptr, dst_ptr, n_cols, ROW_DIV: tl.constexpr, BLOCK_H: tl.constexpr):
    """``dst[i] = src[row[i] // ROW_DIV]``."""
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    src_row = tl.load(row_ptr + i) // ROW_DIV
    vals = tl.load(src_ptr + src_row * n_cols + cols, mask=mask, other=0.0)
    tl.store(dst_ptr + i * n_cols + cols, vals, mask=mask)


@triton.jit
def _weighted_sum_rows(src_ptr, inv_ptr, w_ptr, dst_ptr, n_cols, TOPK: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, BLOCK_H: tl.constexpr):
    """``dst[t] = sum_k w[t,k] * src[inv[t*TOPK+k]]`` (``w = 1`` without weights), fp32 accumulation."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOPK):
        row = tl.load(inv_ptr + t * TOPK + k)
        vals = tl.load(src_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            vals = vals * tl.load(w_ptr + t * TOPK + k).to(tl.float32)
        acc += vals
    tl.store(dst_ptr + t * n_cols + cols, acc.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_bwd(dout_ptr, y_ptr, order_ptr, w_ptr, dy_ptr, dw_ptr, n_cols, TOPK: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    """Per permuted row ``i`` (slot ``s = order[i]``): ``dy[i] = w[s] * dout[s // TOPK]``, ``dw[s] = <dout, y[i]>``."""
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(order_ptr + i)
    token = slot // TOPK
    w = tl.load(w_ptr + slot).to(tl.float32)
    dot = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = cols < n_cols
        g = tl.load(dout_ptr + token * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + i * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dy_ptr + i * n_cols + cols, (w * g).to(dy_ptr.dtype.element_ty), mask=mask)
        dot += g * y
    tl.store(dw_ptr + slot, tl.sum(dot, axis=0))


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inv


def _grid(rows: int, cols: int):
    return (rows, triton.cdiv(cols, BLOCK_H))


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, sort_order, topk):
        hidden = hidden.contiguous()
        n_cols = hidden.shape[1]
        out = hidden.new_empty(sort_order.numel(), n_cols)
        if out.numel():
            _gather_rows[_grid(out.shape[0], n_cols)](hidden, sort_order, out, n_cols, ROW_DIV=topk,
                                                      BLOCK_H=BLOCK_H)
        ctx.save_for_backward(sort_order)
        ctx.topk, ctx.n_tokens = topk, hidden.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (sort_order,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        n_cols = grad_out.shape[1]
        grad_hidden = grad_out.new_empty(ctx.n_tokens, n_cols)
        if grad_hidden.numel():
            _weighted_sum_rows[_grid(ctx.n_tokens, n_cols)](
                grad_out, _inverse(sort_order), grad_out, grad_hidden, n_cols, TOPK=ctx.topk,
                HAS_WEIGHT=False, BLOCK_H=BLOCK_H)
        return grad_hidden, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, sort_order, weights, num_tokens):
        expert_out = expert_out.contiguous()
        weights = weights.contiguous()
        topk = weights.shape[1]
        n_cols = expert_out.shape[1]
        out = expert_out.new_empty(num_tokens, n_cols)
        if out.numel():
            _weighted_sum_rows[_grid(num_tokens, n_cols)](
                expert_out, _inverse(sort_order), weights, out, n_cols, TOPK=topk, HAS_WEIGHT=True,
                BLOCK_H=BLOCK_H)
        ctx.save_for_backward(expert_out, sort_order, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        expert_out, sort_order, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        n_cols = expert_out.shape[1]
        grad_y = torch.empty_like(expert_out)
        grad_w = torch.zeros(weights.shape, dtype=torch.float32, device=weights.device)
        if expert_out.shape[0]:
            _unpermute_bwd[(expert_out.shape[0],)](grad_out, expert_out, sort_order, weights, grad_y,
                                                   grad_w, n_cols, TOPK=weights.shape[1],
                                                   BLOCK_H=BLOCK_H)
        return grad_y, None, grad_w.to(weights.dtype), None


def permute(hidden, indices, num_experts):
    """Dropless dispatch; returns ``(permuted, sort_order, tokens_per_expert)`` like the reference."""
    topk = indices.shape[1]
    flat = indices.reshape(-1)
    sort_order = torch.argsort(flat, stable=True)
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)
    return _Permute.apply(hidden, sort_order, topk), sort_order, tokens_per_expert


def unpermute(expert_out, sort_order, weights, num_tokens):
    """Weighted combine back to token order: ``out[t] = sum_k w[t,k] * y[t,k]``."""
    return _Unpermute.apply(expert_out, sort_order, weights, num_tokens)
