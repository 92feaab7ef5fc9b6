"""Building blocks of a VPMoE decoder layer: norms, RoPE, attention, dense MLP, linear spec.

Every module here is plain PyTorch, device-agnostic (no ``torch.cuda``), and calls the fused
operations only through ``kernels.ops``. Which linear layer class implements a projection is
decided by a :class:`LinearSpec` (plain ``nn.Linear`` by default; ``megatron_vpmoe.parallel``
supplies tensor-parallel ones), so the same module code runs single-process and under TP.

Parameter attributes used by the parallel code (same names as megatron-core where one exists):
``tensor_model_parallel`` / ``partition_dim`` on tensor-parallel shards, ``expert_parallel``
on routed-expert weights, ``tensor_parallel_partial_grad`` on replicated parameters applied
to a rank's own heads only (QK-norm weights, value-residual lambda) or, under sequence
parallelism, to a rank's own slice of the sequence (the norms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import ops
from megatron_vpmoe.config.schema import ModelConfig
from megatron_vpmoe.model.recompute import recomputed


def mark_tensor_parallel(param: torch.Tensor, dim: int) -> None:
    """Tag ``param`` as split along ``dim`` across the tensor-parallel group (megatron-core names)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim


def mark_sequence_parallel_partial(*modules: nn.Module) -> None:
    """Tag the parameters of ``modules`` (replicated, each rank applying them to its own slice of
    the sequence) as having a partial gradient to sum over the tensor-parallel group."""
    for module in modules:
        for p in module.parameters():
            p.tensor_parallel_partial_grad = True


@dataclass
class LinearSpec:
    """Factories for the two kinds of projection in a layer.

    ``column(in, out, bias)`` splits the output dimension across tensor-parallel ranks (its
    input is replicated, its output sharded); ``row(in, out, bias)`` splits the input
    dimension and reduces the output. Both return a module mapping ``x -> y`` with
    parameters named ``weight`` (``[out, in]`` locally) and ``bias``. ``tp_size`` is the
    tensor-parallel world size (1 = plain layers).
    """

    column: Callable[[int, int, bool], nn.Module]
    row: Callable[[int, int, bool], nn.Module]
    tp_size: int = 1
    # sequence parallelism (set by the parallel package): ``column``/``row`` then do not
    # communicate, the layer's region boundaries do (:class:`WholeSequence` documents them);
    # ``tensor_parallel`` is the communicating spec, for the MoE layer's shared experts
    sequence_parallel: Optional[object] = None
    tensor_parallel: Optional["LinearSpec"] = None


class WholeSequence:
    """The boundaries of a layer's tensor-parallel regions when every rank holds the whole
    sequence: nothing happens at them. Under sequence parallelism the parallel package supplies
    objects with the same four methods, on the batch-first sequence dim:

    - ``to_full``: the rank's slice -> the whole sequence, into a region whose column linears
      hold a slice of the heads (backward: reduce-scatter of the partial input gradients);
    - ``from_partial``: a row linear's partial sums -> this rank's slice, reduced (reduce-scatter);
    - ``to_full_replicated``: the rank's slice -> the whole sequence, into a computation every
      rank repeats in full (the MoE layer, the head; backward: keep this rank's slice);
    - ``to_local``: a replicated whole sequence -> this rank's slice (backward: all-gather).
    """

    size = 1

    def to_full(self, x):
        return x

    def from_partial(self, x):
        return x

    def to_full_replicated(self, x):
        return x

    def to_local(self, x):
        return x


WHOLE_SEQUENCE = WholeSequence()


def local_linear_spec() -> LinearSpec:
    """Single-process spec: ``nn.Linear`` for everything."""
    return LinearSpec(column=lambda i, o, b: nn.Linear(i, o, bias=b),
                      row=lambda i, o, b: nn.Linear(i, o, bias=b), tp_size=1)


class RMSNorm(nn.Module):
    """RMSNorm (``kernels.ops.rms_norm``) or LayerNorm, per ``cfg.normalization``."""

    def __init__(self, width: int, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.norm_epsilon
        self.layer_norm = cfg.normalization == "LayerNorm"
        self.weight = nn.Parameter(torch.ones(width))
        if self.layer_norm:
            self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output in ``x``'s dtype (CUDA autocast would return LayerNorm in fp32)."""
        if self.layer_norm:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps).to(x.dtype)
        return ops.rms_norm(x, self.weight, self.eps)


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP activation; for ``swiglu`` the input holds [gate, up] halves."""
    if name == "squared_relu":
        return ops.squared_relu
    if name == "gelu":
        return F.gelu
    if name == "swiglu":
        def swiglu(x: torch.Tensor) -> torch.Tensor:
            gate, up = x.chunk(2, dim=-1)
            return F.silu(gate) * up
        return swiglu
    raise ValueError(f"unknown activation {name!r}")


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding, rotate-half layout (Megatron/HF): ``x [B, S, H, D]``, ``positions [B, S]``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, S, D/2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).unsqueeze(2)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).unsqueeze(2)
    xf = x.float()
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Per-layer key/value cache for generation; sliding-window layers keep only their window."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        return k, v

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, window: Optional[int]) -> None:
        if window is not None and k.shape[1] > window - 1:
            keep = window - 1  # the next query sees itself plus window-1 earlier keys
            k, v = k[:, k.shape[1] - keep:], v[:, v.shape[1] - keep:]
        self.keys[layer], self.values[layer] = k, v

    def select(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (drop finished sequences)."""
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]


class SelfAttention(nn.Module):
    """GQA self-attention with QK-norm, RoPE, sliding window or full causal, sinks, value residual.

    The fused QKV projection's output rows are laid out per query group (megatron-core's
    layout): for each group ``g``, its ``heads/groups`` query heads, then its key head, then
    its value head, each ``kv_channels`` rows. A column split over tensor-parallel ranks
    therefore gives each rank whole query groups.
    """

    def __init__(self, cfg: ModelConfig, layer_number: int, spec: LinearSpec):
        super().__init__()
        self.cfg = cfg
        self.layer_number = layer_number
        tp = spec.tp_size
        self.heads = cfg.num_attention_heads // tp
        self.groups = cfg.num_query_groups // tp
        self.head_dim = cfg.kv_channels
        d = self.head_dim
        bias = cfg.add_bias_linear
        self.linear_qkv = spec.column(
            cfg.hidden_size, (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d, bias)
        self.linear_proj = spec.row(cfg.num_attention_heads * d, cfg.hidden_size, bias)
        if cfg.qk_layernorm:
            self.q_norm = RMSNorm(d, cfg)
            self.k_norm = RMSNorm(d, cfg)
        if cfg.softmax_offset:
            self.sinks = nn.Parameter(torch.zeros(self.heads))
            if tp > 1:
                mark_tensor_parallel(self.sinks, 0)
        self.mix_values = cfg.value_residual and layer_number > 0
        if self.mix_values:
            self.value_lambda = nn.Parameter(torch.tensor(0.5))
        if tp > 1:
            # replicated, but each rank applies them to its own heads only: the gradient is a
            # partial sum that the parallel code all-reduces over the tensor-parallel group
            for p in [*(self.q_norm.parameters() if cfg.qk_layernorm else []),
                      *(self.k_norm.parameters() if cfg.qk_layernorm else []),
                      *([self.value_lambda] if self.mix_values else [])]:
                p.tensor_parallel_partial_grad = True
        self.is_global = cfg.is_global_layer(layer_number)
        self.window = None if self.is_global else cfg.window_size
        self.use_rope = cfg.position_embedding_type == "rope" and not (
            self.is_global and cfg.nope_on_global)

    recompute_core = False  # selective recompute: the attention core is recomputed in backward

    def _core(self, q, k, v, sinks):
        return ops.attention(q, k, v, sinks=sinks, window=self.window, scale=1.0 / math.sqrt(self.head_dim))

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        v_first: Optional[torch.Tensor],
        cache: Optional[KVCache] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x [B, S, H]`` -> (output ``[B, S, H]``, this layer's raw values ``[B, S, groups, D]``)."""
        b, s, _ = x.shape
        d, rep = self.head_dim, self.heads // self.groups
        qkv = self.linear_qkv(x).view(b, s, self.groups, rep + 2, d)
        q = qkv[:, :, :, :rep].reshape(b, s, self.heads, d)
        k = qkv[:, :, :, rep]
        v = qkv[:, :, :, rep + 1]
        raw_v = v
        if self.mix_values:
            if v_first is None:
                raise ValueError(f"layer {self.layer_number} needs layer 0's values (value residual)")
            v = self.value_lambda * v + (1.0 - self.value_lambda) * v_first
        if self.cfg.qk_layernorm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q = apply_rope(q, positions, self.cfg.rotary_base)
            k = apply_rope(k, positions, self.cfg.rotary_base)
        if cache is not None:
            k, v = cache.append(self.layer_number, k, v)
            cache.store(self.layer_number, k, v, self.window)
        sinks = self.sinks if self.cfg.softmax_offset else None
        if self.recompute_core and cache is None and torch.is_grad_enabled():
            out = recomputed(self._core, q, k, v, sinks)
        else:
            out = self._core(q, k, v, sinks)
        return self.linear_proj(out.reshape(b, s, self.heads * d)), raw_v


class MLP(nn.Module):
    """Dense MLP (``fc1`` column-parallel, ``fc2`` row-parallel); ReLU^2 by default."""

    def __init__(self, cfg: ModelConfig, ffn_hidden_size: int, spec: LinearSpec):
        super().__init__()
        up = 2 * ffn_hidden_size if cfg.activation == "swiglu" else ffn_hidden_size
        if cfg.activation == "swiglu" and spec.tp_size > 1:
            raise ValueError("swiglu with tensor parallelism is not supported (gate/up halves)")
        self.linear_fc1 = spec.column(cfg.hidden_size, up, cfg.add_bias_linear)
        self.linear_fc2 = spec.row(ffn_hidden_size, cfg.hidden_size, cfg.add_bias_linear)
        self.act = activation_fn(cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))
