"""The MoE layer: fp32 router with aux-loss-free expert bias, grouped-GEMM experts, dispatch.

Routing (``kernels.ops.route``) and dropless dispatch (``kernels.ops.permute/unpermute``)
come from the kernels package. Routed experts run as one grouped GEMM
(``torch.nn.functional.grouped_mm``) over tokens sorted by expert; where that op is missing
a padded batched matmul is used instead, never a Python loop over experts (the loop exists
only as :meth:`GroupedExperts.forward_loop`, the benchmark's peer).

Precision: the router always computes in fp32 with autocast off; the experts compute in the
dtype of the tokens they receive (the activation dtype: bf16 under bf16 autocast, whose
rules do not cover ``grouped_mm``), and the fp32 routing weights are cast to it where they
scale the expert outputs (``unpermute``).

Where tokens go to be computed is a *dispatcher*: :class:`LocalDispatcher` runs every expert
in this process; ``megatron_vpmoe.parallel.expert`` supplies an all-to-all one for expert
parallelism. Both share the same router and expert modules.
"""

from __future__ import annotations

import math

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_vpmoe.kernels import ops
from megatron_vpmoe.config.schema import ModelConfig
from megatron_vpmoe.model.layers import MLP, LinearSpec, activation_fn
from megatron_vpmoe.model.recompute import is_recomputing, recomputed
from megatron_vpmoe.model.splits import declare_expert

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """``x [N, in]`` sorted by expert, ``weight [E, in, out]`` -> ``[N, out]`` (row i uses its expert).

    ``F.grouped_mm`` needs row strides that are multiples of 16 bytes; other shapes and dtypes
    take the padded batched form."""
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[1], weight.shape[2]))
    if _HAS_GROUPED_MM and aligned and x.dtype in (torch.float32, torch.bfloat16):
        offs = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(x.contiguous(), weight, offs=offs))
    return _padded_bmm(x, weight, tokens_per_expert)


def group_row_alignment(x: torch.Tensor) -> int:
    """Rows each expert's group must be a multiple of for ``x``'s grouped GEMM: on CUDA, the
    kernel (and its weight-gradient GEMM, whose reduction runs over the groups' rows) needs
    every group to start on a 16-byte boundary, i.e. ``16 / element_size`` rows (8 for bf16);
    the CPU kernel and the batched fallback need nothing (1)."""
    return 16 // x.element_size() if x.is_cuda and _HAS_GROUPED_MM else 1


def pad_expert_groups(x: torch.Tensor, tokens_per_expert: torch.Tensor, multiple: int):
    """Pad each expert's group of rows (``x`` sorted by expert) with zero rows to a multiple of
    ``multiple`` rows. Returns ``(padded_x, padded_tokens_per_expert, rows)``: ``rows[i]`` is
    where row ``i`` of ``x`` sits in ``padded_x``, so ``y.index_select(0, rows)`` strips the
    padding from a result ``y``; ``rows`` is None (nothing padded) when ``multiple <= 1``."""
    if multiple <= 1:
        return x, tokens_per_expert, None
    counts = tokens_per_expert.to(torch.long)
    padded = (counts + multiple - 1) // multiple * multiple
    expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts,
                                            output_size=x.shape[0])
    shift = (torch.cumsum(padded, 0) - padded) - (torch.cumsum(counts, 0) - counts)
    rows = torch.arange(x.shape[0], device=x.device) + shift[expert_of_row]
    out = x.new_zeros(int(padded.sum()), x.shape[1]).index_copy(0, rows, x)
    return out, padded.to(tokens_per_expert.dtype), rows


def _padded_bmm(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Batched fallback: scatter rows into ``[E, max_tokens, in]``, one ``bmm``, gather back."""
    e = weight.shape[0]
    counts = tokens_per_expert.to(torch.long)
    max_tokens = int(counts.max()) if counts.numel() else 0
    expert_of_row = torch.repeat_interleave(torch.arange(e, device=x.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]
    padded = x.new_zeros(e, max(max_tokens, 1), x.shape[1])
    padded = padded.index_put((expert_of_row, slot), x)
    out = torch.bmm(padded, weight)
    return out[expert_of_row, slot]


class Router(nn.Module):
    """fp32 router: ``weight [E, H]`` (parameter) and ``expert_bias [E]`` (buffer, selection only).

    Counts tokens routed to each expert (``tokens_per_expert``, a non-persistent buffer) until
    :meth:`update_expert_bias` consumes them, and sums the entropy of each training token's normalised
    scores over ``ln(experts)`` (``entropy_stats = [sum, tokens]``, on device) until the trainer reads it at a log step.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.num_moe_experts
        self.weight = nn.Parameter(torch.empty(e, cfg.hidden_size, dtype=torch.float32))
        self.register_buffer("expert_bias", torch.zeros(e, dtype=torch.float32))
        self.register_buffer("tokens_per_expert", torch.zeros(e, dtype=torch.float32), persistent=False)
        self.register_buffer("entropy_stats", torch.zeros(2, dtype=torch.float32), persistent=False)

    def forward(self, tokens: torch.Tensor):
        """``tokens [T, H]`` (any dtype) -> fp32 ``(weights [T, K], indices [T, K], scores [T, E])``."""
        cfg = self.cfg
        bias = self.expert_bias if cfg.moe_router_enable_expert_bias else None
        with torch.autocast(tokens.device.type, enabled=False):  # logits and top-k in fp32
            logits = F.linear(tokens.float(), self.weight.float())
            weights, indices, scores = ops.route(
                logits, bias, cfg.moe_router_topk, cfg.moe_router_num_groups,
                cfg.moe_router_group_topk, cfg.moe_router_topk_scaling_factor,
                cfg.moe_router_score_function)
        if not is_recomputing():  # a recompute replays a forward already counted
            # metrics only: no autograd graph (a recompute must save what the forward saved)
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(
                    indices.reshape(-1), minlength=cfg.num_moe_experts).float()
                if self.training:  # validation forwards are not training's routing
                    p = scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)
                    self.entropy_stats[0] += -(p * p.clamp_min(1e-12).log()).sum() / math.log(max(p.shape[-1], 2))
                    self.entropy_stats[1] += scores.shape[0]
        return weights, indices, scores

    @torch.no_grad()
    def update_expert_bias(self, load: Optional[torch.Tensor] = None, apply: Optional[torch.Tensor] = None) -> None:
        """``bias += rate * sign(mean(load) - load)``; resets the counters. ``apply`` (a bool
        tensor): update only where true, decided on the device (a skipped step keeps the bias)."""
        load = self.tokens_per_expert if load is None else load.to(self.expert_bias.device).float()
        if self.cfg.moe_router_enable_expert_bias:
            delta = self.cfg.moe_router_bias_update_rate * torch.sign(load.mean() - load)
            if apply is not None:
                delta = delta * apply.to(delta.device, delta.dtype)
            self.expert_bias += delta
        self.tokens_per_expert.zero_()


class GroupedExperts(nn.Module):
    """``num_local_experts`` routed experts stored as stacked weights for grouped GEMM.

    ``fc1_weight [E, H, up]`` (``up`` = 2F for swiglu, F otherwise), ``fc2_weight [E, F, H]``,
    optional ``fc1_bias [E, up]``, ``fc2_bias [E, H]``. Note the ``[in, out]`` orientation
    (``x @ W``), the transpose of ``nn.Linear``.
    """

    def __init__(self, cfg: ModelConfig, num_local_experts: int):
        super().__init__()
        f, h = cfg.moe_ffn_hidden_size, cfg.hidden_size
        up = 2 * f if cfg.activation == "swiglu" else f
        self.num_local_experts = num_local_experts
        self.fc1_weight = nn.Parameter(torch.empty(num_local_experts, h, up))
        self.fc2_weight = nn.Parameter(torch.empty(num_local_experts, f, h))
        self.params_with_bias = cfg.add_bias_linear
        if cfg.add_bias_linear:
            self.fc1_bias = nn.Parameter(torch.zeros(num_local_experts, up))
            self.fc2_bias = nn.Parameter(torch.zeros(num_local_experts, h))
        for p in self.parameters():
            declare_expert(p)
        self.act = activation_fn(cfg.activation)

    def _bias_rows(self, bias: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return bias.repeat_interleave(tokens_per_expert.to(torch.long), dim=0)

    recompute = False  # selective recompute: the experts' MLP is recomputed in backward

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``x [N, H]`` sorted by local expert, ``tokens_per_expert [E_local]`` -> ``[N, H]``,
        computed in ``x``'s dtype (fp32 weights cast to it; their gradients stay fp32)."""
        if self.recompute and torch.is_grad_enabled():
            return recomputed(self._mlp, x, tokens_per_expert)
        return self._mlp(x, tokens_per_expert)

    def _mlp(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        x, tokens_per_expert, rows = pad_expert_groups(x, tokens_per_expert, group_row_alignment(x))
        hidden = grouped_matmul(x, self.fc1_weight.to(x.dtype), tokens_per_expert)
        if self.params_with_bias:
            hidden = hidden + self._bias_rows(self.fc1_bias, tokens_per_expert).to(x.dtype)
        out = grouped_matmul(self.act(hidden), self.fc2_weight.to(x.dtype), tokens_per_expert)
        if self.params_with_bias:
            out = out + self._bias_rows(self.fc2_bias, tokens_per_expert).to(x.dtype)
        return out if rows is None else out.index_select(0, rows)

    def forward_loop(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Same result with a Python loop over experts (benchmark peer and test reference)."""
        outs, start = [], 0
        for e, n in enumerate(tokens_per_expert.tolist()):
            rows = x[start:start + int(n)]
            start += int(n)
            hidden = rows @ self.fc1_weight[e]
            if self.params_with_bias:
                hidden = hidden + self.fc1_bias[e]
            out = self.act(hidden) @ self.fc2_weight[e]
            if self.params_with_bias:
                out = out + self.fc2_bias[e]
            outs.append(out)
        return torch.cat(outs, dim=0)


class LocalDispatcher:
    """Dropless dispatch to experts held in this process: permute, grouped GEMM, unpermute."""

    def __call__(self, tokens, weights, indices, experts: GroupedExperts, num_experts: int):
        permuted, sort_order, tokens_per_expert = ops.permute(tokens, indices, num_experts)
        expert_out = experts(permuted, tokens_per_expert)
        return ops.unpermute(expert_out, sort_order, weights, tokens.shape[0])


def sequence_aux_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int, cfg: ModelConfig) -> torch.Tensor:
    """Sequence-level balance loss (DeepSeek-V3): mean over sequences of ``sum_i f_i * P_i``.

    ``f_i = E / (K * S) * #tokens of the sequence choosing i``; ``P_i`` = mean over the
    sequence of the normalised scores. Not multiplied by the coefficient.
    """
    e, k = cfg.num_moe_experts, cfg.moe_router_topk
    t = scores.shape[0]
    s = t // batch
    probs = scores / (scores.sum(-1, keepdim=True) + 1e-20)
    probs = probs.view(batch, s, e).mean(1)  # [B, E]
    chosen = torch.zeros(t, e, device=scores.device).scatter_(1, indices, 1.0).view(batch, s, e)
    frac = chosen.sum(1) * (e / (k * s))  # [B, E]
    return (frac.detach() * probs).sum(-1).mean()


class _AddAuxLossGrad(torch.autograd.Function):
    """Identity on ``out``; in backward ``aux`` gets gradient 1, as if it were added to the loss.

    So each MoE layer backpropagates its own aux loss wherever its output's gradient flows,
    also on pipeline stages that never see the loss (the last stage's loss cannot reach them)."""

    @staticmethod
    def forward(ctx, out, aux):
        ctx.aux_shape = aux.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.aux_shape, dtype=torch.float32, device=grad.device)


class MoELayer(nn.Module):
    """Router + routed experts (via a dispatcher) + always-on shared expert(s).

    With ``aux_grad_scale > 0`` (set by the training engine per step: ``1 / (micro-batches x DP)``)
    the layer adds ``moe_aux_loss_coeff x aux_grad_scale x`` its sequence aux loss to the objective
    through the backward pass (:class:`_AddAuxLossGrad`) and accumulates that value, detached,
    in ``aux_loss_sum`` for logging (read once per step, no host sync in the layer)."""

    aux_grad_scale = 0.0

    def __init__(self, cfg: ModelConfig, spec: LinearSpec, num_local_experts: Optional[int] = None,
                 dispatcher=None):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg, num_local_experts or cfg.num_moe_experts)
        if cfg.moe_shared_expert_intermediate_size > 0 and cfg.moe_num_shared_experts > 0:
            self.shared_experts = nn.ModuleList(
                [MLP(cfg, cfg.moe_shared_expert_intermediate_size, spec)
                 for _ in range(cfg.moe_num_shared_experts)])
        else:
            self.shared_experts = None
        self.dispatcher = dispatcher or LocalDispatcher()
        self.last_aux_loss: Optional[torch.Tensor] = None
        self.aux_loss_sum: Optional[torch.Tensor] = None  # what the objective got since the last reset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        tokens = x.reshape(b * s, h)
        weights, indices, scores = self.router(tokens)
        if self.cfg.moe_aux_loss_coeff > 0 and self.training:
            self.last_aux_loss = sequence_aux_loss(scores, indices, b, self.cfg)
        else:
            self.last_aux_loss = None
        out = self.dispatcher(tokens, weights, indices, self.experts, self.cfg.num_moe_experts)
        if self.shared_experts is not None:
            for shared in self.shared_experts:
                out = out + shared(tokens)
        if self.last_aux_loss is not None and self.aux_grad_scale > 0 and torch.is_grad_enabled():
            scaled = self.last_aux_loss * (self.cfg.moe_aux_loss_coeff * self.aux_grad_scale)
            out = _AddAuxLossGrad.apply(out, scaled)
            if not is_recomputing():
                self.aux_loss_sum = self.aux_loss_sum + scaled.detach() if self.aux_loss_sum is not None \
                    else scaled.detach()
        return out.view(b, s, h)
