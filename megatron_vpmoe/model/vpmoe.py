"""The VPMoE decoder-only language model as one plain ``nn.Module``.

``VpmoeModel(cfg)`` is the whole model in one process. The same class builds a pipeline
stage (``layer_numbers`` a contiguous slice, ``pre_process``/``post_process`` for the
embedding and the head), a tensor-parallel shard (a tensor-parallel :class:`LinearSpec`) and
an expert-parallel shard (``num_local_experts`` plus an all-to-all dispatcher): the
parallel package passes those in, this module never imports it. State-dict keys are the
same in every layout (layers are keyed by their global number); see docs/model_api.md.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_vpmoe.kernels import ops
from megatron_vpmoe.config.schema import ModelConfig
from megatron_vpmoe.model.init import ShardOf, draw_base_seed, initialize_parameters
from megatron_vpmoe.model.layers import (
    MLP,
    WHOLE_SEQUENCE,
    KVCache,
    LinearSpec,
    RMSNorm,
    SelfAttention,
    local_linear_spec,
    mark_sequence_parallel_partial,
)
from megatron_vpmoe.model.moe import MoELayer
from megatron_vpmoe.model.tpa import TensorProductAttention
from megatron_vpmoe.model.recompute import recomputed
from megatron_vpmoe.utils.errors import ConfigError


def activation_dtype(x: torch.Tensor) -> torch.dtype:
    """The residual stream's dtype: autocast's (bf16 under ``train.precision: bf16``) when
    autocast is on for ``x``'s device, else ``x``'s own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class TransformerLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (dense MLP or MoE)."""

    def __init__(self, cfg: ModelConfig, layer_number: int, spec: LinearSpec,
                 num_local_experts: Optional[int] = None, dispatcher=None):
        super().__init__()
        self.cfg = cfg
        self.layer_number = layer_number
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg)
        attention = TensorProductAttention if cfg.attention_kind(layer_number) == "tpa" else SelfAttention
        self.self_attention = attention(cfg, layer_number, spec)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg)
        self.is_moe = cfg.is_moe_layer(layer_number)
        if self.is_moe:  # runs on the whole sequence (see forward): communicating TP linears
            self.mlp = MoELayer(cfg, spec.tensor_parallel or spec, num_local_experts, dispatcher)
        else:
            self.mlp = MLP(cfg, cfg.ffn_hidden_size, spec)
        if spec.sequence_parallel is not None:  # each rank normalises its own slice of the sequence
            mark_sequence_parallel_partial(self.input_layernorm, self.pre_mlp_layernorm)

    def forward(self, x, positions, v_first, cache: Optional[KVCache] = None, regions=WHOLE_SEQUENCE):
        """``regions``: the tensor-parallel region boundaries (:class:`WholeSequence`; under
        sequence parallelism ``x`` is this rank's slice of the sequence and the residual stream,
        the norms and dropout stay sliced)."""
        p = self.cfg.hidden_dropout if self.training else 0.0
        attn, values = self.self_attention(regions.to_full(self.input_layernorm(x)), positions, v_first, cache)
        x = x + F.dropout(regions.from_partial(attn), p)
        h = self.pre_mlp_layernorm(x)
        if self.is_moe:  # routing, load counts and the aux loss see the whole sequence on every rank
            out = regions.to_local(self.mlp(regions.to_full_replicated(h)))
        else:
            out = regions.from_partial(self.mlp(regions.to_full(h)))
        return x + F.dropout(out, p), values


class VpmoeModel(nn.Module):
    """VPMoE language model. See docs/model_api.md for the interface other packages use.

    ``forward(input_ids [B, S], position_ids=None, labels=None)`` returns fp32 logits
    ``[B, S, V]`` without labels, else the per-token fp32 loss ``[B, S]`` (``labels[b, t]`` is the
    target at position ``t``; ``-100`` is ignored) computed without full logits. Under autocast
    the activations are in the autocast dtype from the embedding on (see docs/model.md,
    "Precision"); parameters keep their own dtype.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        spec: Optional[LinearSpec] = None,
        *,
        layer_numbers: Optional[Sequence[int]] = None,
        pre_process: bool = True,
        post_process: bool = True,
        num_local_experts: Optional[int] = None,
        dispatcher=None,
        initialize: bool = True,
    ):
        super().__init__()
        cfg.validate()
        # drawn before any submodule exists: their constructors' default inits use the RNG too
        base_seed = draw_base_seed() if initialize else None
        if cfg.attention_dropout > 0:
            raise ConfigError("attention dropout is not supported by kernels.ops.attention",
                              key="model.attention_dropout")
        self.cfg = cfg
        spec = spec or local_linear_spec()
        self.layer_numbers = list(range(cfg.num_layers) if layer_numbers is None else layer_numbers)
        self.pre_process, self.post_process = pre_process, post_process
        if pre_process:
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({
            str(i): TransformerLayer(cfg, i, spec, num_local_experts, dispatcher)
            for i in self.layer_numbers})
        if post_process:
            self.final_layernorm = RMSNorm(cfg.hidden_size, cfg)
            if cfg.untie_embeddings_and_output_weights:
                self.output_layer = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            elif not pre_process:
                raise ConfigError("tied embeddings need the embedding and the head on one stage",
                                  key="model.untie_embeddings_and_output_weights")
        self.sequence_parallel = spec.sequence_parallel  # None, or the TP group's sequence split
        if self.sequence_parallel is not None and post_process:
            mark_sequence_parallel_partial(self.final_layernorm)
        self.recompute = "none"  # activation recompute: none | selective | full (set_recompute)
        if initialize:
            self.reset_parameters(base_seed)

    # -- initialisation -------------------------------------------------------------------
    def reset_parameters(self, base_seed: Optional[int] = None, shard_of: Optional[ShardOf] = None) -> None:
        """Deterministic under ``torch.manual_seed`` (one draw gives the base seed): matrices
        ~ N(0, init_method_std), norms 1, biases and sinks 0, value-residual lambdas 0.5, each
        parameter from its own generator (``model/init.py``), so a shard built alone under the
        parallel engine (``shard_of`` names its slices) gets the single-process values."""
        seed = draw_base_seed() if base_seed is None else base_seed
        initialize_parameters(self, seed, self.cfg.init_method_std, shard_of)

    def set_recompute(self, mode: str) -> None:
        """Activation recompute in backward: ``selective`` recomputes the attention core and the
        routed experts' MLP, ``full`` whole layers; ``none`` keeps every activation."""
        if mode not in ("none", "selective", "full"):
            raise ConfigError(f"unknown recompute mode {mode!r} (none | selective | full)",
                              key="train.recompute")
        self.recompute = mode
        for layer in self.layers.values():
            layer.self_attention.recompute_core = mode == "selective"
            if layer.is_moe:
                layer.mlp.experts.recompute = mode == "selective"

    # -- the three pieces of a forward (pipeline stages run a subset) --------------------
    def regions(self, seq_len: int, cache: Optional[KVCache] = None):
        """The tensor-parallel region boundaries for a forward over ``seq_len`` tokens: the
        sequence split over the TP group under sequence parallelism (training and scoring),
        else the whole sequence (a KV-cache generation step, a length the TP size does not
        divide when no gradient is taken; without sequence parallelism always)."""
        sp = self.sequence_parallel
        if sp is None:
            return WHOLE_SEQUENCE
        if cache is None and seq_len % sp.size == 0:
            return sp.split
        if cache is None and torch.is_grad_enabled():
            raise ValueError(f"sequence parallelism splits the sequence over {sp.size} tensor-parallel "
                             f"ranks; a training sequence of {seq_len} tokens is not divisible by it")
        return sp.whole

    def embed(self, input_ids: torch.Tensor, regions=WHOLE_SEQUENCE) -> torch.Tensor:
        """Token embeddings in the activation dtype (:func:`activation_dtype`), which every
        later residual add, MoE dispatch and pipeline send then keeps (under sequence
        parallelism: this rank's slice of the sequence)."""
        hidden = self.embedding(input_ids)
        return regions.to_local(hidden.to(activation_dtype(hidden)))

    def run_layers(self, hidden, positions, v_first=None, cache: Optional[KVCache] = None,
                   layer_numbers: Optional[Sequence[int]] = None, regions=None):
        """Run this module's layers (or only ``layer_numbers``, a pipeline chunk); returns
        ``(hidden, v_first)`` (layer 0's values). With ``recompute == "full"`` each layer's
        activations are recomputed in backward (only its inputs are kept). ``regions``: as
        :meth:`regions` gives (default: for ``positions``' length and ``cache``)."""
        if regions is None:
            regions = self.regions(positions.shape[-1], cache)
        keys = list(self.layers) if layer_numbers is None else [str(i) for i in layer_numbers]
        for key in keys:
            layer = self.layers[key]
            if self.recompute == "full" and cache is None and torch.is_grad_enabled():
                hidden, values = recomputed(layer, hidden, positions, v_first, None, regions)
            else:
                hidden, values = layer(hidden, positions, v_first, cache, regions)
            if int(key) == 0:
                v_first = values
        return hidden, v_first

    def head_weight(self) -> torch.Tensor:
        if self.cfg.untie_embeddings_and_output_weights:
            return self.output_layer.weight
        return self.embedding.weight

    def head(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None, regions=WHOLE_SEQUENCE) -> torch.Tensor:
        hidden = regions.to_full_replicated(self.final_layernorm(hidden))
        weight = self.head_weight()
        if labels is None:  # the GEMM in the activation dtype, as the loss's; logits fp32
            with torch.autocast(hidden.device.type, enabled=False):
                return F.linear(hidden, weight.to(hidden.dtype)).float()
        b, s, h = hidden.shape
        losses = ops.linear_cross_entropy(hidden.reshape(b * s, h), weight, labels.reshape(b * s))
        return losses.view(b, s)

    @staticmethod
    def default_positions(input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        b, s = input_ids.shape
        return torch.arange(offset, offset + s, device=input_ids.device).unsqueeze(0).expand(b, s)

    def forward(self, input_ids, position_ids=None, labels=None, cache: Optional[KVCache] = None):
        if not (self.pre_process and self.post_process):
            raise RuntimeError("a pipeline stage runs embed/run_layers/head, not forward()")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        positions = self.default_positions(input_ids) if position_ids is None else position_ids
        regions = self.regions(input_ids.shape[1], cache)
        hidden, _ = self.run_layers(self.embed(input_ids, regions), positions, None, cache, regions=regions)
        return self.head(hidden, labels, regions)

    # -- MoE bookkeeping --------------------------------------------------------------------
    def moe_layers(self) -> list:
        return [layer.mlp for layer in self.layers.values() if layer.is_moe]

    def aux_loss(self) -> torch.Tensor:
        """Sequence-level aux loss of the last forward, times ``moe_aux_loss_coeff`` (0 if off)."""
        total = torch.zeros((), device=next(self.parameters()).device)
        for moe in self.moe_layers():
            if moe.last_aux_loss is not None:
                total = total + moe.last_aux_loss
        return total * self.cfg.moe_aux_loss_coeff

    def set_aux_loss_scale(self, scale: float) -> None:
        """Each MoE layer adds ``coeff x scale x`` its aux loss to the objective through backward
        (0: off; the engine sets ``1 / (micro-batches x DP)`` for a training step) and the
        accumulated values restart from zero."""
        for moe in self.moe_layers():
            moe.aux_grad_scale = scale
            moe.aux_loss_sum = None

    def aux_loss_added(self) -> torch.Tensor:
        """The aux loss this module's layers added to the objective since ``set_aux_loss_scale``."""
        total = torch.zeros((), device=next(self.parameters()).device)
        for moe in self.moe_layers():
            if moe.aux_loss_sum is not None:
                total = total + moe.aux_loss_sum
        return total

    def expert_load(self) -> torch.Tensor:
        """Tokens routed per expert since the last bias update, ``[num_moe_layers, num_experts]``."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, self.cfg.num_moe_experts)
        return torch.stack([m.router.tokens_per_expert.clone() for m in layers])

    def update_expert_bias(self, load: Optional[torch.Tensor] = None, apply: Optional[torch.Tensor] = None) -> None:
        """Aux-loss-free balancing step for every MoE layer; ``load`` as from :meth:`expert_load`
        (all-reduced over data parallel ranks), default this process's counters; ``apply``: see
        :meth:`Router.update_expert_bias`."""
        for i, moe in enumerate(self.moe_layers()):
            moe.router.update_expert_bias(None if load is None else load[i], apply)

    def balance_metric(self, load: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """Per-layer ``max/mean`` load (1.0 = perfectly balanced) and the worst layer's value."""
        load = self.expert_load() if load is None else load
        out: Dict[str, float] = {}
        if load.numel() == 0:
            return out
        numbers = [layer.layer_number for layer in self.layers.values() if layer.is_moe]
        ratios = load.max(1).values / load.mean(1).clamp_min(1e-9)
        for number, ratio, row in zip(numbers, ratios.tolist(), load):
            out[f"layer{number}/max_over_mean"] = ratio
            out[f"layer{number}/min_over_mean"] = float(row.min() / row.mean().clamp_min(1e-9))
        out["max_over_mean"] = float(ratios.max())
        out["mean_max_over_mean"] = float(ratios.mean())
        return out
