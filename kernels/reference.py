"""Pure-PyTorch reference implementations of VPMoE's fused operations.

These are the semantics every fused kernel must reproduce, and what the model runs on CPU
(and on GPUs without Triton). Device-agnostic; no ``torch.cuda`` calls.

Conventions
- Attention tensors are ``[batch, seq, heads, head_dim]``.
- A sliding window of ``w`` lets query ``i`` see keys ``j`` with ``i - w < j <= i``.
- The attention sink (GPT-OSS "softmax offset") is a learnable logit per head that joins
  the softmax denominator but contributes no value.
- The ALiBi distance bias (GRAPE-A) adds ``-slope[h] * (i - j)`` to the score of query ``i``
  and key ``j`` in head ``h`` (positions counted in the key sequence, so it streams with a cache).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in fp32, returned in ``x``'s dtype."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype)


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU(x)^2, the routed experts' activation (no GLU)."""
    r = F.relu(x)
    return r * r  # not torch.square: CUDA autocast runs pow in fp32, and grouped_mm needs x's dtype


def route(
    logits: torch.Tensor,
    expert_bias: Optional[torch.Tensor],
    topk: int,
    num_groups: int = 1,
    group_topk: int = 1,
    scaling_factor: float = 1.0,
    score_function: str = "sigmoid",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-limited top-k routing.

    ``logits``: ``[tokens, experts]`` (the router runs in fp32). Scores are ``sigmoid`` (or
    ``softmax``) of the logits. Selection uses ``scores + expert_bias`` (the bias steers
    selection only): experts are split into ``num_groups`` contiguous groups, a group's score
    is the sum of its top-2 selection scores (top-1 if a group has one expert), the best
    ``group_topk`` groups are kept, and the top-``topk`` experts among them are chosen.
    Weights are the unbiased scores of the chosen experts, normalised to sum to 1 (sigmoid
    only; softmax scores are used as they are), times ``scaling_factor``.

    Returns ``(weights [tokens, topk] float32, indices [tokens, topk] int64, scores [tokens, experts])``.
    """
    logits = logits.float()
    tokens, experts = logits.shape
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits)
    elif score_function == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        raise ValueError(f"unknown score function {score_function!r}")
    select = scores if expert_bias is None else scores + expert_bias.float()
    if num_groups > 1:
        per_group = experts // num_groups
        grouped = select.view(tokens, num_groups, per_group)
        group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)
        keep = group_scores.topk(group_topk, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, -1, per_group).reshape(tokens, experts)
        select = select.masked_fill(~expert_mask, float("-inf"))
    indices = select.topk(topk, dim=-1).indices
    weights = scores.gather(1, indices)
    if score_function == "sigmoid" and topk > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, indices, scores


def permute(
    hidden: torch.Tensor, indices: torch.Tensor, num_experts: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dropless dispatch: copy each token once per chosen expert, sorted by expert.

    ``hidden [tokens, H]``, ``indices [tokens, topk]``. Returns
    ``(permuted [tokens*topk, H], sort_order [tokens*topk], tokens_per_expert [experts] int64)``
    where ``permuted[i] = hidden[sort_order[i] // topk]`` and rows are grouped by expert in
    increasing expert id (stable within an expert).
    """
    topk = indices.shape[1]
    flat = indices.reshape(-1)
    sort_order = torch.argsort(flat, stable=True)
    permuted = hidden.index_select(0, sort_order // topk)
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)
    return permuted, sort_order, tokens_per_expert


def unpermute(
    expert_out: torch.Tensor, sort_order: torch.Tensor, weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Inverse of :func:`permute` with the routing weights: ``out[t] = sum_k w[t,k] * y[t,k]``."""
    topk = weights.shape[1]
    flat_weights = weights.reshape(-1).index_select(0, sort_order).unsqueeze(-1)
    weighted = expert_out * flat_weights.to(expert_out.dtype)
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return out.index_add(0, sort_order // topk, weighted)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    scale: Optional[float] = None,
    alibi: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal attention with an optional sliding window, per-head sink logits and ALiBi bias.

    ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]`` with ``Hq % Hkv == 0`` (GQA). Queries are
    the last ``Sq`` positions of the ``Sk`` keys (``Sq == Sk`` in training; ``Sq < Sk`` when
    decoding against a cache). ``window=None`` is full causal attention. Returns ``[B, Sq, Hq, D]``
    in ``q``'s dtype; scores, softmax and the weighted sum are fp32 even under autocast (as the
    fused kernel's fp32 accumulators).
    """
    with torch.autocast(q.device.type, enabled=False):
        return _attention_fp32(q, k, v, sinks, window, scale, alibi)


def _attention_fp32(q, k, v, sinks, window, scale, alibi=None):
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    rep = hq // hkv
    if rep > 1:
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [B, H, Sq, Sk]
    qpos = torch.arange(sk - sq, sk, device=q.device).unsqueeze(-1)
    kpos = torch.arange(sk, device=q.device).unsqueeze(0)
    visible = kpos <= qpos
    if alibi is not None:
        scores = scores - alibi.float().view(1, hq, 1, 1) * (qpos - kpos).float()
    if window is not None:
        visible = visible & (kpos > qpos - window)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, hq, 1, 1).expand(b, hq, sq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vf)  # [B, H, Sq, D]
    return out.transpose(1, 2).to(q.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token CE of ``hidden @ weight.T`` computed chunk by chunk; logits never stored."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size):
        n = hidden.shape[0]
        losses = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        w = weight.to(hidden.dtype)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = (hidden[start:end] @ w.t()).float()  # matmul in hidden's dtype, softmax in fp32
            lab = labels[start:end]
            valid = lab != ignore_index
            safe = torch.where(valid, lab, torch.zeros_like(lab))
            target = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
            # log-sum-exp in place (torch.logsumexp would allocate a second [chunk, V] buffer)
            row_max = logits.amax(dim=-1, keepdim=True)
            lse = logits.sub_(row_max).exp_().sum(-1).log_() + row_max.squeeze(1)
            losses[start:end] = torch.where(valid, lse - target, torch.zeros_like(lse))
            del logits  # free this chunk before the next one is computed
        ctx.save_for_backward(hidden, weight, labels)
        ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, labels = ctx.saved_tensors
        n = hidden.shape[0]
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        w = weight.to(hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # the forward's logits, recomputed
            for start in range(0, n, ctx.chunk_size):
                end = min(start + ctx.chunk_size, n)
                h = hidden[start:end]
                logits = (h @ w.t()).float()
                lab = labels[start:end]
                valid = lab != ctx.ignore_index
                safe = torch.where(valid, lab, torch.zeros_like(lab))
                # softmax in place: the chunk holds one [chunk, V] buffer at a time
                probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
                probs /= probs.sum(-1, keepdim=True)
                probs[torch.arange(end - start, device=h.device), safe] -= 1.0
                probs *= (valid.float() * grad_losses[start:end].float()).unsqueeze(1)
                g = probs.to(hidden.dtype)  # the logits' gradient feeds matmuls in hidden's dtype
                grad_hidden[start:end] = g @ w
                grad_weight += (g.t() @ h).float()  # accumulated over chunks in fp32
                del logits, probs, g
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-token cross-entropy of the LM head ``hidden [N, H] @ weight [V, H].T`` against ``labels [N]``.

    The matmul runs in ``hidden``'s dtype (``weight`` cast to it: bf16 activations give a bf16
    head GEMM, fp32 ones an fp32 GEMM), whatever autocast says; the logits are then upcast and
    the log-softmax, loss and the logits' gradient are fp32. The gradient's two matmuls run in
    ``hidden``'s dtype too; the weight gradient is accumulated over chunks in fp32 and returned in
    ``weight``'s dtype (fp32 master weights get fp32 gradients).

    Never materialises the ``[N, V]`` logits: forward and backward each recompute one chunk of
    ``chunk_size`` rows at a time. Returns fp32 losses ``[N]`` (0 where ``labels == ignore_index``).
    """
    with torch.autocast(hidden.device.type, enabled=False):  # the GEMM dtype is hidden's alone
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_size)
