"""One layout's plan: per-rank memory, step time (compute, bubble, communication), tokens/s/GPU and MFU.

Step time = compute of the slowest pipeline rank at ``efficiency`` x the GPU's dense bf16
peak, stretched by the pipeline bubble ``(pp - 1) / (vpp x micro-batches)``, plus
communication that the engine does not overlap: expert all-to-all (dispatch + combine,
forward and backward), tensor-parallel all-reduces, pipeline sends and the data-parallel
gradient all-reduce, each at NVLink bandwidth inside an NVLink domain and InfiniBand across.
These are estimates until a GPU run exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from megatron_vpmoe.parallel.layout import rank_layers
from megatron_vpmoe.plan.flops import head_forward_flops, layer_forward_flops, training_flops_per_token
from megatron_vpmoe.plan.gpu import GpuSpec
from megatron_vpmoe.plan.layouts import Layout
from megatron_vpmoe.plan.memory import F32, RankMemory, act_bytes, expert_parameter_count, plan_memory

DEFAULT_EFFICIENCY = 0.4  # achieved / peak matmul throughput (stated assumption, see docs/plan.md)


@dataclass
class Plan:
    layout: Layout
    gpu: GpuSpec
    ranks: List[RankMemory]
    step_s: float
    time_parts: Dict[str, float]
    tokens_per_s_per_gpu: float
    mfu: float
    tflops_per_gpu: float
    flops_per_token: float
    micro_batches: int
    schedule: str

    @property
    def peak(self) -> int:
        return max(r.peak for r in self.ranks)

    @property
    def tight_rank(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu.memory_bytes

    def as_dict(self) -> dict:
        return {"layout": self.layout.as_dict(), "gpu": self.gpu.name, "fits": self.fits,
                "peak_bytes": self.peak, "gpu_memory_bytes": self.gpu.memory_bytes,
                "tight_pp_rank": self.tight_rank.pp_rank,
                "ranks": [{"pp_rank": r.pp_rank, "params": r.params, "peak_bytes": r.peak,
                           "peak_moment": r.peak_moment, "in_flight": r.in_flight,
                           "components": r.components(), "moments": r.moments} for r in self.ranks],
                "step_s": self.step_s, "time_parts_s": self.time_parts,
                "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu, "mfu": self.mfu,
                "tflops_per_gpu": self.tflops_per_gpu, "flops_per_token": self.flops_per_token,
                "micro_batches": self.micro_batches, "schedule": self.schedule,
                "estimate": True}


def _bandwidth(gpu: GpuSpec, span: int) -> float:
    """Bytes/s for a collective over ``span`` consecutive ranks (NVLink inside a domain)."""
    return (gpu.nvlink_gbps if span <= gpu.nvlink_domain else gpu.ib_gbps) * 1e9


def plan_layout(cfg, layout: Layout, gpu: GpuSpec, efficiency: float = DEFAULT_EFFICIENCY) -> Plan:
    m = cfg.model
    seq, gbs = cfg.data.seq_length, cfg.train.global_batch_size
    # reference kernels = the CPU device: its memory is the host's (checkpoint staging included) and
    # AdamW updates its tensors one at a time; GPUs run foreach kernels
    on_host = gpu.kernels == "reference"
    ranks = plan_memory(cfg, layout, gpu.kernels, int(gpu.framework_overhead_gb * 1e9),
                        staging_on_device=on_host, foreach_optimizer=not on_host)
    micro = layout.micro_batches(gbs)
    t = layout.mb * seq
    a = act_bytes(cfg.train.precision)
    rate = gpu.peak_flops * efficiency
    vpp = layout.vpp if layout.pp > 1 else 1
    stage_s = []
    for r in range(layout.pp):
        flops = 0.0
        for i in rank_layers(m.num_layers, layout.pp, vpp, r):
            f = layer_forward_flops(m, i, seq)
            extra = 0.0
            if layout.recompute == "full":
                extra = sum(f.values())
            elif layout.recompute == "selective":
                extra = f["attention_core"] + f.get("routed_experts", 0.0)
            flops += 3 * sum(f.values()) + extra
        if r == layout.pp - 1:
            flops += 3 * head_forward_flops(m)
        stage_s.append(flops * t / layout.tp / rate)  # one micro-batch through the rank's layers
    compute = max(stage_s) * micro
    bubble = compute * (layout.pp - 1) / (vpp * micro) if layout.pp > 1 else 0.0
    moe_layers = max(sum(1 for i in rank_layers(m.num_layers, layout.pp, vpp, r) if m.is_moe_layer(i))
                     for r in range(layout.pp))
    layers = max(len(rank_layers(m.num_layers, layout.pp, vpp, r)) for r in range(layout.pp))
    parts = {"compute": compute, "bubble": bubble}
    if layout.ep > 1:
        per = t * m.moe_router_topk * m.hidden_size * a * (layout.ep - 1) / layout.ep
        parts["all_to_all"] = 4 * per * moe_layers * micro / _bandwidth(gpu, layout.tp * layout.ep)
    if layout.tp > 1:
        per = t * m.hidden_size * a * 2 * (layout.tp - 1) / layout.tp
        parts["tensor_parallel"] = 4 * per * layers * micro / _bandwidth(gpu, layout.tp)
    if layout.pp > 1:
        parts["pipeline_p2p"] = 2 * t * m.hidden_size * a * micro * vpp / _bandwidth(gpu, layout.world)
    tight = max(ranks, key=lambda r: r.params)
    experts = expert_parameter_count(m, layout.ep, layout.pp, vpp, tight.pp_rank)
    dp_s = 0.0
    if layout.dp > 1:
        dense = (tight.params - experts) * F32
        dp_s += 2 * dense * (layout.dp - 1) / layout.dp / _bandwidth(gpu, layout.world // layout.pp)
    if layout.expert_dp > 1:
        dp_s += 2 * experts * F32 * (layout.expert_dp - 1) / layout.expert_dp / _bandwidth(gpu, layout.world // layout.pp)
    parts["data_parallel"] = dp_s
    step = sum(parts.values())
    tokens = gbs * seq
    per_gpu = tokens / step / layout.world
    ftok = training_flops_per_token(m, seq)
    tflops = ftok * per_gpu
    return Plan(layout=layout, gpu=gpu, ranks=ranks, step_s=step, time_parts=parts, tokens_per_s_per_gpu=per_gpu,
                mfu=tflops / gpu.peak_flops, tflops_per_gpu=tflops / 1e12, flops_per_token=ftok,
                micro_batches=micro, schedule=layout.schedule(gbs))
