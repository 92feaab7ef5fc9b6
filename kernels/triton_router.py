"""Triton fused router, semantics of ``kernels.reference.route``.

One kernel does, for a block of tokens: scores (sigmoid or softmax of fp32 logits), selection
scores (+ expert bias), per-group top-2 sums, the best ``group_topk`` groups, top-``topk``
experts among them (descending, lowest index first on ties), the gathered unbiased weights,
their normalisation (sigmoid, ``topk > 1``) and scaling. The backward of ``weights`` and
``scores`` w.r.t. the logits is the reference's formula in PyTorch with the chosen indices fixed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_fwd(logits_ptr, bias_ptr, scores_ptr, weights_ptr, indices_ptr, n_tokens, n_experts,
               scaling, HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr, NORMALISE: tl.constexpr,
               TOPK: tl.constexpr, NUM_GROUPS: tl.constexpr, GROUP_TOPK: tl.constexpr,
               PER_GROUP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < n_tokens
    col_ok = cols < n_experts
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * n_experts + cols[None, :]
    neg_inf = float("-inf")
    logits = tl.load(logits_ptr + offs, mask=ok, other=neg_inf).to(tl.float32)
    if SOFTMAX:
        row_max = tl.where(row_ok, tl.max(logits, axis=1), 0.0)
        e = tl.where(ok, tl.exp(logits - row_max[:, None]), 0.0)
        scores = e / tl.where(row_ok, tl.sum(e, axis=1), 1.0)[:, None]
    else:
        scores = tl.where(ok, 1.0 / (1.0 + tl.exp(-logits)), 0.0)
    tl.store(scores_ptr + offs, scores, mask=ok)
    select = scores
    if HAS_BIAS:
        select = select + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    select = tl.where(ok, select, neg_inf)
    big = BLOCK_E + 1
    if NUM_GROUPS > 1:
        group_of = cols // PER_GROUP
        gcols = tl.arange(0, BLOCK_G)
        group_scores = tl.full([BLOCK_T, BLOCK_G], neg_inf, tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            in_g = (group_of == g)[None, :] & ok
            vals = tl.where(in_g, select, neg_inf)
            top1 = tl.max(vals, axis=1)
            score = top1
            if PER_GROUP > 1:
                first = tl.min(tl.where(in_g & (vals == top1[:, None]), cols[None, :], big), axis=1)
                top2 = tl.max(tl.where(cols[None, :] == first[:, None], neg_inf, vals), axis=1)
                score = top1 + top2
            group_scores = tl.where(gcols[None, :] == g, score[:, None], group_scores)
        keep = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
        for _ in tl.static_range(GROUP_TOPK):
            best = tl.max(group_scores, axis=1)
            best_g = tl.min(tl.where(group_scores == best[:, None], gcols[None, :], BLOCK_G + 1), axis=1)
            keep = keep | (group_of[None, :] == best_g[:, None])
            group_scores = tl.where(gcols[None, :] == best_g[:, None], neg_inf, group_scores)
        select = tl.where(keep, select, neg_inf)
    kcols = tl.arange(0, BLOCK_K)
    chosen_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    chosen_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    for k in tl.static_range(TOPK):
        best = tl.max(select, axis=1)
        idx = tl.min(tl.where(select == best[:, None], cols[None, :], big), axis=1)
        hit = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        chosen_w = tl.where(kcols[None, :] == k, w[:, None], chosen_w)
        chosen_i = tl.where(kcols[None, :] == k, idx.to(tl.int64)[:, None], chosen_i)
        select = tl.where(hit, neg_inf, select)
    if NORMALISE:
        chosen_w = chosen_w / (tl.sum(chosen_w, axis=1)[:, None] + 1e-20)
    chosen_w = chosen_w * scaling
    out_ok = row_ok[:, None] & (kcols < TOPK)[None, :]
    out_offs = rows.to(tl.int64)[:, None] * TOPK + kcols[None, :]
    tl.store(weights_ptr + out_offs, chosen_w, mask=out_ok)
    tl.store(indices_ptr + out_offs, chosen_i, mask=out_ok)


def _differentiable_weights(logits, indices, topk, scaling_factor, score_function):
    """The reference's weights/scores as functions of ``logits`` for fixed ``indices``."""
    scores = torch.sigmoid(logits) if score_function == "sigmoid" else torch.softmax(logits, dim=-1)
    weights = scores.gather(1, indices)
    if score_function == "sigmoid" and topk > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, scores


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, expert_bias, topk, num_groups, group_topk, scaling_factor, score_function):
        logits = logits.float().contiguous()
        tokens, experts = logits.shape
        if score_function not in ("sigmoid", "softmax"):
            raise ValueError(f"unknown score function {score_function!r}")
        if num_groups > 1 and experts % num_groups:
            raise ValueError(f"{experts} experts do not split into {num_groups} groups")
        eligible = experts if num_groups <= 1 else min(group_topk, num_groups) * (experts // num_groups)
        if not 1 <= topk <= eligible or (num_groups > 1 and not 1 <= group_topk <= num_groups):
            raise ValueError(f"cannot choose top-{topk} of {experts} experts in the best {group_topk} "
                             f"of {num_groups} groups")
        scores = torch.empty_like(logits)
        weights = torch.empty(tokens, topk, dtype=torch.float32, device=logits.device)
        indices = torch.empty(tokens, topk, dtype=torch.int64, device=logits.device)
        if tokens:
            block_t = 16
            bias = expert_bias.float().contiguous() if expert_bias is not None else logits
            _route_fwd[(triton.cdiv(tokens, block_t),)](
                logits, bias, scores, weights, indices, tokens, experts, float(scaling_factor),
                HAS_BIAS=expert_bias is not None, SOFTMAX=score_function == "softmax",
                NORMALISE=score_function == "sigmoid" and topk > 1, TOPK=topk,
                NUM_GROUPS=num_groups, GROUP_TOPK=group_topk,
                PER_GROUP=experts // max(num_groups, 1), BLOCK_T=block_t,
                BLOCK_E=triton.next_power_of_2(experts), BLOCK_K=triton.next_power_of_2(topk),
                BLOCK_G=triton.next_power_of_2(max(num_groups, 1)))
        ctx.save_for_backward(logits, indices)
        ctx.args = (topk, scaling_factor, score_function)
        ctx.mark_non_differentiable(indices)
        return weights, indices, scores

    @staticmethod
    def backward(ctx, grad_weights, grad_indices, grad_scores):
        logits, indices = ctx.saved_tensors
        topk, scaling_factor, score_function = ctx.args
        with torch.enable_grad():
            x = logits.detach().requires_grad_()
            weights, scores = _differentiable_weights(x, indices, topk, scaling_factor, score_function)
            outs, grads = [], []
            for out, grad in ((weights, grad_weights), (scores, grad_scores)):
                if grad is not None:
                    outs.append(out)
                    grads.append(grad)
            (grad_logits,) = torch.autograd.grad(outs, x, grads) if outs else (torch.zeros_like(x),)
        return grad_logits, None, None, None, None, None, None


def route(logits, expert_bias, topk, num_groups=1, group_topk=1, scaling_factor=1.0,
          score_function="sigmoid"):
    """Fused group-limited top-k routing; returns ``(weights, indices, scores)`` like the reference."""
    return _Route.apply(logits, expert_bias, topk, num_groups, group_topk, scaling_factor,
                        score_function)
