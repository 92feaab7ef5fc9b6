"""Step time of one pipeline rank's compute: GEMMs by shape class, memory-bound work at bandwidth, host dispatch per op.

Per micro-batch, the device works through

    t_gemm    = dense-GEMM FLOPs / (peak x GEMM_EFFICIENCY)             projections, router, dense and
                                                                        shared MLPs, the LM head
    t_expert  = routed FLOPs / (peak x GEMM_EFFICIENCY x m / (m + M_HALF))  grouped GEMMs at m tokens per
                                                                        local expert: small m is slow
    t_attn    = attention-core FLOPs / (peak x ATTENTION_EFFICIENCY)    causal / windowed flash kernels
    t_memory  = (TOKEN_BYTES x tokens x layers x hidden
                 + PARAM_BYTES_PER_MICRO x rank parameters) / bandwidth  norms, RoPE, activations, residuals,
                                                                        routing permutes; the engine's
                                                                        per-micro-batch weight casts and
                                                                        fp32 gradient accumulation

while the host dispatches ``ops x HOST_OP_S`` (aten ops per micro-batch from :data:`OPS_PER_MICRO_BATCH`,
counted by ``TorchDispatchMode`` over one forward + backward). The GPU runs asynchronously, so a
micro-batch costs ``max(device, host)``; the optimizer step adds ``OPTIMIZER_BYTES`` per parameter the
rank steps (ZeRO: its share) at bandwidth.

The constants are calibrated once from the profiled H200 runs in ``benchmarks/results``
(``profile_6b_slice_bf16_cuda.txt``, ``profile_medium_bf16_cuda.txt``, the launch-bound medium run of
``device_step_cuda.json``) and checked against every measured device run there
(``tests/plan/test_throughput.py``, docs/plan.md): they describe today's engine on Hopper-class GPUs
and move with it (a run of ``benchmarks/device_check.sh`` re-measures them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from megatron_vpmoe.parallel.layout import rank_layers, shard_parameter_count
from megatron_vpmoe.plan.flops import head_forward_flops, layer_forward_flops
from megatron_vpmoe.plan.gpu import GpuSpec
from megatron_vpmoe.plan.layouts import Layout
from megatron_vpmoe.plan.memory import act_bytes, expert_parameter_count

# Dense GEMMs: (aten::mm + grouped GEMM CUDA time) / their FLOPs in the 6B-slice profile, 0.52 of peak.
GEMM_EFFICIENCY = 0.52
# Tokens per local expert at which grouped expert GEMMs reach half of GEMM_EFFICIENCY: 413 (6B slice,
# 128 tokens/expert at 12% of peak) and 645 (medium, 512 tokens/expert at 23%); their mean.
M_HALF = 530.0
# Triton flash attention (forward, dq, dkdv) over its causal/windowed FLOPs: 6.4% (medium) to 8.7% (6B).
ATTENTION_EFFICIENCY = 0.075
# Memory-bound device time not in GEMMs or attention, split by least squares over the two profiles into
# a per-token part (bytes per token, per layer, per hidden unit) and a per-parameter part that each
# micro-batch pays (today's engine casts fp32 weights to bf16 at every use and accumulates fp32
# gradients: the profiles' aten::copy_ and add_).
TOKEN_BYTES = 1040.0
PARAM_BYTES_PER_MICRO = 200.0
# AdamW over fp32 parameter, gradient and two moments, each read and written.
OPTIMIZER_BYTES = 32.0
# Host seconds per dispatched aten op: the medium model at micro-batch 4 is launch-bound (0.377 s per
# step for 4 x 7,984 ops, the count of the engine it ran; its GPU time is 0.147 s).
HOST_OP_S = 11.8e-6
# aten ops per micro-batch (forward + backward, bf16 autocast) by part, counted on CPU with the
# reference kernels for today's engine (RoPE tables built once per forward: 381/508/88 before);
# tests/plan/test_throughput.py recounts them on a small model.
OPS_PER_MICRO_BATCH = {"dense_layer": 349, "moe_layer": 469, "embedding_and_head": 104}


@dataclass(frozen=True)
class RankCompute:
    """One pipeline rank's compute over a step, by part (seconds); ``step_s`` is what the step waits for."""

    gemm: float
    experts: float
    attention: float
    memory: float
    optimizer: float
    host: float

    @property
    def device(self) -> float:
        return self.gemm + self.experts + self.attention + self.memory + self.optimizer

    @property
    def step_s(self) -> float:
        return max(self.device, self.host + self.optimizer)

    @property
    def bound(self) -> str:
        return "device" if self.device >= self.host + self.optimizer else "host"

    def as_dict(self) -> Dict[str, float]:
        return {"gemm": self.gemm, "experts": self.experts, "attention": self.attention, "memory": self.memory,
                "optimizer": self.optimizer, "host": self.host, "device": self.device}


def expert_tokens(cfg, layout: Layout, tokens: int) -> float:
    """Tokens one local expert processes per micro-batch: the rank's ``tokens x topk`` routed over all
    experts, gathered from the ``ep`` ranks of its expert group."""
    return tokens * cfg.moe_router_topk * layout.ep / max(cfg.num_moe_experts, 1)


def rank_compute(cfg, layout: Layout, gpu: GpuSpec, pp_rank: int, micro_batches: int) -> RankCompute:
    """Compute time of pipeline rank ``pp_rank`` over one step of ``micro_batches`` micro-batches."""
    m = cfg.model
    seq = cfg.data.seq_length
    tokens = layout.mb * seq
    bandwidth = gpu.memory_gbps * 1e9
    peak = gpu.peak_flops
    scale = act_bytes(cfg.train.precision) / 2  # the calibration ran bf16 activations
    vpp = layout.vpp if layout.pp > 1 else 1
    layers = rank_layers(m.num_layers, layout.pp, vpp, pp_rank)
    dense_flops = expert_flops = attention_flops = 0.0
    ops = 0
    for i in layers:
        f = layer_forward_flops(m, i, seq)
        recompute = 0.0
        if layout.recompute == "full":
            recompute = 1.0
        attn = f.pop("attention_core")
        routed = f.pop("routed_experts", 0.0)
        selective = 1.0 if layout.recompute == "selective" else 0.0
        attention_flops += (3 + recompute + selective) * attn
        expert_flops += (3 + recompute + selective) * routed
        dense_flops += (3 + recompute) * sum(f.values())
        ops += OPS_PER_MICRO_BATCH["moe_layer" if m.is_moe_layer(i) else "dense_layer"]
    if pp_rank == layout.pp - 1:
        dense_flops += 3 * head_forward_flops(m)
    if pp_rank in (0, layout.pp - 1):
        ops += OPS_PER_MICRO_BATCH["embedding_and_head"]
    local_tokens = expert_tokens(m, layout, tokens)
    expert_rate = peak * GEMM_EFFICIENCY * local_tokens / (local_tokens + M_HALF) if local_tokens else peak
    params = shard_parameter_count(m, tp=layout.tp, ep=layout.ep, pp=layout.pp, vpp=vpp, pp_rank=pp_rank)
    experts = expert_parameter_count(m, layout.ep, layout.pp, vpp, pp_rank)
    stepped = params
    if layout.zero:
        stepped = (params - experts) / layout.dp + experts / max(layout.expert_dp, 1)
    per_token = TOKEN_BYTES * scale * tokens * len(layers) * m.hidden_size / layout.tp
    per_param = PARAM_BYTES_PER_MICRO * params if cfg.train.precision == "bf16" else 0.0
    return RankCompute(
        gemm=micro_batches * dense_flops * tokens / layout.tp / (peak * GEMM_EFFICIENCY),
        experts=micro_batches * expert_flops * tokens / layout.tp / expert_rate,
        attention=micro_batches * attention_flops * tokens / layout.tp / (peak * ATTENTION_EFFICIENCY),
        memory=micro_batches * (per_token + per_param) / bandwidth,
        optimizer=OPTIMIZER_BYTES * stepped / bandwidth,
        host=micro_batches * ops * HOST_OP_S)
