"""One layout's plan: per-rank memory, step time (compute, bubble, communication), tokens/s/GPU and MFU.

Step time = compute of the slowest pipeline rank (``plan/throughput.py``: GEMMs by shape class,
memory-bound work at the GPU's bandwidth and the host's per-op dispatch, calibrated on measured
runs; or a flat ``efficiency`` x the dense bf16 peak when one is given), stretched by the pipeline
bubble ``(pp - 1) / (vpp x micro-batches)``, plus
communication that the engine does not overlap: expert all-to-all (dispatch + combine,
forward and backward), tensor-parallel all-reduces, pipeline sends and the data-parallel
gradient all-reduce, each at NVLink bandwidth inside an NVLink domain and InfiniBand across.
Communication terms are datasheet estimates (one GPU has been measured, no multi-GPU run yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from megatron_vpmoe.parallel.layout import rank_layers
from megatron_vpmoe.plan.flops import head_forward_flops, layer_forward_flops, training_flops_per_token
from megatron_vpmoe.plan.gpu import GpuSpec
from megatron_vpmoe.plan.layouts import Layout
from megatron_vpmoe.plan.memory import F32, RankMemory, act_bytes, expert_parameter_count, plan_memory
from megatron_vpmoe.plan.throughput import rank_compute


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
    compute_parts: Dict[str, float]
    bound: str  # "device", "host" (dispatch-bound), or "flat" (a given --efficiency)

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
                "compute_parts_s": self.compute_parts, "bound": self.bound, "estimate": True}


def _bandwidth(gpu: GpuSpec, span: int) -> float:
    """Bytes/s for a collective over ``span`` consecutive ranks (NVLink inside a domain)."""
    return (gpu.nvlink_gbps if span <= gpu.nvlink_domain else gpu.ib_gbps) * 1e9


def _flat_stage_s(cfg, layout: Layout, rate: float, pp_rank: int) -> float:
    """One micro-batch through the rank's layers at a flat ``rate`` FLOP/s (``--efficiency`` given)."""
    m, seq = cfg.model, cfg.data.seq_length
    vpp = layout.vpp if layout.pp > 1 else 1
    flops = 0.0
    for i in rank_layers(m.num_layers, layout.pp, vpp, pp_rank):
        f = layer_forward_flops(m, i, seq)
        extra = 0.0
        if layout.recompute == "full":
            extra = sum(f.values())
        elif layout.recompute == "selective":
            extra = f["attention_core"] + f.get("routed_experts", 0.0)
        flops += 3 * sum(f.values()) + extra
    if pp_rank == layout.pp - 1:
        flops += 3 * head_forward_flops(m)
    return flops * layout.mb * seq / layout.tp / rate


def plan_layout(cfg, layout: Layout, gpu: GpuSpec, efficiency: Optional[float] = None) -> Plan:
    """The plan of ``layout``; ``efficiency`` replaces the calibrated compute model by a flat fraction of peak."""
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
    vpp = layout.vpp if layout.pp > 1 else 1
    if efficiency is None:
        per_rank = [rank_compute(cfg, layout, gpu, r, micro) for r in range(layout.pp)]
        slowest = max(per_rank, key=lambda c: c.step_s)
        compute, compute_parts, bound = slowest.step_s, slowest.as_dict(), slowest.bound
    else:
        compute = max(_flat_stage_s(cfg, layout, gpu.peak_flops * efficiency, r) for r in range(layout.pp)) * micro
        compute_parts, bound = {}, "flat"
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
                micro_batches=micro, schedule=layout.schedule(gbs), compute_parts=compute_parts, bound=bound)
