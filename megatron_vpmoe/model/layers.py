"""Building blocks of a VPMoE decoder layer: norms, the KV cache, GQA attention, dense MLP, linear spec.

Every module here is plain PyTorch, device-agnostic (no ``torch.cuda``), and calls the fused
operations only through ``kernels.ops``. Which linear layer class implements a projection is
decided by a :class:`LinearSpec` (plain ``nn.Linear`` by default; ``megatron_vpmoe.parallel``
supplies tensor-parallel ones), so the same module code runs single-process and under TP.

Splits declared for the parallel code (``model/splits.py``): tensor-parallel shards (the
attention sinks; the TP linears ``parallel/tensor.py`` supplies), and partial gradients of
replicated parameters applied to a rank's own heads only (QK-norm weights, value-residual
lambda, GRAPE-M parameters, TPA's dim-factor projection) or, under sequence parallelism, to a
rank's own slice of the sequence (the norms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_vpmoe.kernels import ops
from megatron_vpmoe.config.schema import ModelConfig
from megatron_vpmoe.model import values
from megatron_vpmoe.model.positions import GrapeM, alibi_slopes, apply_rope
from megatron_vpmoe.model.recompute import recomputed
from megatron_vpmoe.model.splits import declare_partial_grad, declare_tensor_parallel


def mark_sequence_parallel_partial(*modules: nn.Module) -> None:
    """Declare the parameters of ``modules`` (replicated, each rank applying them to its own slice
    of the sequence) as having a partial gradient to sum over the tensor-parallel group."""
    for module in modules:
        for p in module.parameters():
            declare_partial_grad(p)


@dataclass
class LinearSpec:
    """Factories for the two kinds of projection in a layer.

    ``column(in, out, bias)`` splits the output dimension across tensor-parallel ranks (its
    input is replicated, its output sharded); ``row(in, out, bias)`` splits the input
    dimension and reduces the output. Both return a module mapping ``x -> y`` with
    parameters named ``weight`` (``[out, in]`` locally) and ``bias``. ``replicated(in, out,
    bias)`` is a whole linear on every rank whose output feeds only the rank's own heads (TPA's
    dim factors): its input gradient is summed over the group, its weight gradient is partial
    (declared with ``model.splits.declare_partial_grad``). ``tp_size``/``tp_rank``: the tensor-parallel
    world size (1 = plain layers) and this rank's index in it.
    """

    column: Callable[[int, int, bool], nn.Module]
    row: Callable[[int, int, bool], nn.Module]
    tp_size: int = 1
    tp_rank: int = 0
    replicated: Callable[[int, int, bool], nn.Module] = lambda i, o, b: nn.Linear(i, o, bias=b)
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


class KVCache:
    """Per-layer cache for generation: each layer keeps the tensors it attends over (GQA: keys and
    values; TPA: its key and value factors), ``[B, S, ...]``; sliding-window layers keep only
    their window."""

    def __init__(self, num_layers: int):
        self.entries: list[Optional[Tuple[torch.Tensor, ...]]] = [None] * num_layers

    def update(self, layer: int, tensors: Tuple[torch.Tensor, ...], window: Optional[int]) -> Tuple[torch.Tensor, ...]:
        """Append this step's ``tensors`` to the layer's cache; returns the whole sequence, and
        keeps the last ``window - 1`` positions (the next query sees itself plus those)."""
        if self.entries[layer] is not None:
            tensors = tuple(torch.cat([old, new], dim=1) for old, new in zip(self.entries[layer], tensors))
        kept = tensors
        if window is not None and tensors[0].shape[1] > window - 1:
            keep = window - 1
            kept = tuple(t[:, t.shape[1] - keep:] for t in tensors)
        self.entries[layer] = kept
        return tensors

    @property
    def keys(self) -> list:
        """The first cached tensor of each layer (GQA: the keys)."""
        return [None if e is None else e[0] for e in self.entries]

    def select(self, index: torch.Tensor) -> None:
        """Keep the batch rows ``index`` (drop finished sequences)."""
        self.entries = [None if e is None else tuple(t.index_select(0, index) for t in e) for e in self.entries]

    def bytes_per_token(self) -> int:
        """Bytes this cache holds per cached position, summed over layers (one batch row)."""
        return sum(t[0, 0].numel() * t.element_size() for e in self.entries if e is not None for t in e)


class AttentionBase(nn.Module):
    """What every attention layer shares: output projection, QK-norm, sinks, value-residual
    lambda, its positions (RoPE, GRAPE-M, ALiBi or none), the window and the attention core."""

    def __init__(self, cfg: ModelConfig, layer_number: int, spec: LinearSpec):
        super().__init__()
        self.cfg = cfg
        self.layer_number = layer_number
        tp = spec.tp_size
        self.heads = cfg.num_attention_heads // tp
        self.head_dim = d = cfg.kv_channels
        bias = cfg.add_bias_linear
        self.linear_proj = spec.row(cfg.num_attention_heads * d, cfg.hidden_size, bias)
        if cfg.qk_layernorm:
            self.q_norm = RMSNorm(d, cfg)
            self.k_norm = RMSNorm(d, cfg)
        if cfg.softmax_offset:
            self.sinks = nn.Parameter(torch.zeros(self.heads))
            if tp > 1:
                declare_tensor_parallel(self.sinks, 0)
        self.mix_values = cfg.value_residual and layer_number > 0
        if self.mix_values:
            self.value_lambda = nn.Parameter(torch.tensor(0.5))
        self.is_global = cfg.is_global_layer(layer_number)
        self.window = None if self.is_global else cfg.window_size
        self.position = cfg.position_kind(layer_number)
        if self.position == "grape_m":
            self.grape = GrapeM(d, cfg.rotary_base, cfg.grape_m_learnable_freq, cfg.grape_m_learnable_basis)
        own = None  # ALiBi: this rank's heads' slopes (a fixed buffer, not state)
        if self.position == "alibi":
            own = torch.tensor(alibi_slopes(cfg.num_attention_heads), dtype=torch.float32)
            own = own[spec.tp_rank * self.heads:(spec.tp_rank + 1) * self.heads]
        self.register_buffer("alibi_slopes", own, persistent=False)

    def mark_partial_grads(self, tp: int, extra=()) -> None:
        """Under TP: replicated parameters applied to this rank's heads only get partial gradients
        that the parallel code all-reduces over the tensor-parallel group."""
        if tp == 1:
            return
        for name, p in self.named_parameters():
            if name.startswith(("q_norm.", "k_norm.", "grape.")) or name == "value_lambda":
                declare_partial_grad(p)
        for p in extra:
            declare_partial_grad(p)

    def position_encode(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate queries/keys (or their dim factors) ``[B, S, N, D]`` for RoPE / GRAPE-M."""
        if self.position == "rope":
            return apply_rope(x, positions, self.cfg.rotary_base)
        if self.position == "grape_m":
            return self.grape(x, positions)
        return x

    recompute_core = False  # selective recompute: the attention core is recomputed in backward

    def _core(self, q, k, v, sinks):
        return ops.attention(q, k, v, sinks=sinks, window=self.window, scale=1.0 / math.sqrt(self.head_dim),
                             alibi=self.alibi_slopes)

    def attend(self, q, k, v, cache: Optional[KVCache]) -> torch.Tensor:
        """The core on ``q [B, S, H, D]`` and ``k, v [B, Sk, Hkv, D]``, then the output projection."""
        b, s = q.shape[:2]
        sinks = self.sinks if self.cfg.softmax_offset else None
        if self.recompute_core and cache is None and torch.is_grad_enabled():
            out = recomputed(self._core, q, k, v, sinks)
        else:
            out = self._core(q, k, v, sinks)
        return self.linear_proj(out.reshape(b, s, self.heads * self.head_dim))


class SelfAttention(AttentionBase):
    """GQA self-attention with QK-norm, RoPE/GRAPE-M/ALiBi, sliding window or full causal, sinks,
    value residual.

    The fused QKV projection's output rows are laid out per query group (megatron-core's
    layout): for each group ``g``, its ``heads/groups`` query heads, then its key head, then
    its value head, each ``kv_channels`` rows. A column split over tensor-parallel ranks
    therefore gives each rank whole query groups. When layer 0 is TPA, the value residual mixes
    in factor form (``model/values.py``): the layer caches its keys and value factors and
    attends with per-head values.
    """

    def __init__(self, cfg: ModelConfig, layer_number: int, spec: LinearSpec):
        super().__init__(cfg, layer_number, spec)
        self.groups = cfg.num_query_groups // spec.tp_size
        self.linear_qkv = spec.column(
            cfg.hidden_size, (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.kv_channels,
            cfg.add_bias_linear)
        self.mix_factors = self.mix_values and cfg.attention_kind(0) == "tpa"
        self.mark_partial_grads(spec.tp_size)

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
        if self.mix_values and v_first is None:
            raise ValueError(f"layer {self.layer_number} needs layer 0's values (value residual)")
        if self.mix_values and not self.mix_factors:
            v = self.value_lambda * v + (1.0 - self.value_lambda) * v_first
        if self.cfg.qk_layernorm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.position_encode(q, positions), self.position_encode(k, positions)
        if self.mix_factors:  # layer 0 is TPA: values mixed as factors, expanded per head
            mixed = values.mix(self.value_lambda, values.group_factors(v, self.heads),
                               values.unpack(v_first, self.cfg, self.heads))
            if cache is not None:
                k, *mixed = cache.update(self.layer_number, (k, *mixed), self.window)
            return self.attend(q, k.repeat_interleave(rep, dim=2), values.expand(mixed), cache), raw_v
        if cache is not None:
            k, v = cache.update(self.layer_number, (k, v), self.window)
        return self.attend(q, k, v, cache), raw_v


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
