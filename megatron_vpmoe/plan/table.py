"""The human summary of one plan (``vpmoe plan``, the launchers' plan gate): per-stage memory, time, throughput."""

from __future__ import annotations

from typing import List

from megatron_vpmoe.plan.search import GB


def gb(n: float) -> str:
    """Bytes as decimal GB with two decimals (the planner's tables)."""
    return f"{n / GB:.2f}"


def plan_table(plan) -> List[str]:
    """The human summary of one plan: layout, per-stage memory by component, time and throughput."""
    lay = plan.layout
    lines = [f"layout {lay.short()} on {lay.world} x {plan.gpu.name}: dp={lay.dp}, "
             f"{plan.micro_batches} micro-batches per step, schedule {plan.schedule}"]
    comps = list(plan.ranks[0].components())
    short = {"parameters": "params", "gradients": "grads", "optimizer": "optim", "activations": "activ",
             "working": "layer_bwd", "head_loss": "head", "embedding_grad": "emb_grad", "all_to_all": "a2a",
             "pipeline_buffers": "p2p", "optimizer_step": "opt_step", "grad_reduce": "grad_red",
             "checkpoint_staging": "ckpt_host", "autocast_weights": "bf16_w", "framework": "framework"}
    lines.append("| pp rank | " + " | ".join(short[c] for c in comps) + " | in flight | peak GB (moment) |")
    lines.append("|---" * (len(comps) + 3) + "|")
    for r in plan.ranks:
        c = r.components()
        lines.append(f"| {r.pp_rank} | " + " | ".join(gb(c[k]) for k in comps) +
                     f" | {r.in_flight} | **{gb(r.peak)}** ({r.peak_moment}) |")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"peak {gb(plan.peak)} GB on pipeline rank {plan.tight_rank.pp_rank} of {plan.gpu.memory_gb:g} GB: {verdict}")
    parts = ", ".join(f"{k} {v:.3g}" for k, v in plan.time_parts.items())
    bound = {"device": "compute device-bound", "host": "compute host-bound (op dispatch)", "flat": "flat efficiency"}
    lines.append(f"step {plan.step_s:.3g} s ({parts}; {bound[plan.bound]}); {plan.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, "
                 f"{plan.tflops_per_gpu:.0f} TFLOP/s/GPU, MFU {plan.mfu:.1%} (estimates)")
    return lines
