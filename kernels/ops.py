"""One dispatch for VPMoE's fused operations: Triton kernels on CUDA, references elsewhere.

The model calls only these functions. On a CUDA device with Triton importable (and
``VPMOE_DISABLE_TRITON`` unset) the fused kernel runs; otherwise the PyTorch reference in
``kernels.reference`` does. Both follow the reference's documented semantics exactly.
"""

from __future__ import annotations

import os

import torch

from megatron_vpmoe.kernels import reference


def triton_available() -> bool:
    if os.environ.get("VPMOE_DISABLE_TRITON"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_available()


def rms_norm(x, weight, eps: float = 1e-5):
    if _use_triton(x):
        from megatron_vpmoe.kernels import triton_norm
        return triton_norm.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def squared_relu(x):
    if _use_triton(x):
        from megatron_vpmoe.kernels import triton_activation
        return triton_activation.squared_relu(x)
    return reference.squared_relu(x)


def route(logits, expert_bias, topk, num_groups=1, group_topk=1, scaling_factor=1.0,
          score_function="sigmoid"):
    if _use_triton(logits):
        from megatron_vpmoe.kernels import triton_router
        return triton_router.route(logits, expert_bias, topk, num_groups, group_topk,
                                   scaling_factor, score_function)
    return reference.route(logits, expert_bias, topk, num_groups, group_topk, scaling_factor,
                           score_function)


def permute(hidden, indices, num_experts):
    if _use_triton(hidden):
        from megatron_vpmoe.kernels import triton_dispatch
        return triton_dispatch.permute(hidden, indices, num_experts)
    return reference.permute(hidden, indices, num_experts)


def unpermute(expert_out, sort_order, weights, num_tokens):
    if _use_triton(expert_out):
        from megatron_vpmoe.kernels import triton_dispatch
        return triton_dispatch.unpermute(expert_out, sort_order, weights, num_tokens)
    return reference.unpermute(expert_out, sort_order, weights, num_tokens)


def attention(q, k, v, sinks=None, window=None, scale=None, alibi=None):
    if _use_triton(q):
        from megatron_vpmoe.kernels import triton_attention
        return triton_attention.attention(q, k, v, sinks, window, scale, alibi)
    return reference.attention(q, k, v, sinks, window, scale, alibi)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, chunk_size=1024):
    if _use_triton(hidden):
        from megatron_vpmoe.kernels import triton_loss
        return triton_loss.linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size)
    return reference.linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size)
