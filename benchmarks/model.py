"""Benchmark: forward+backward tokens/s of a ~50M-parameter VPMoE on CPU, against peers in the same run.

Peers: (1) a dense model with the same active parameter count per token, (2) the same MoE
with its routed experts computed by a Python loop over experts instead of one grouped GEMM.
Writes benchmarks/results/model.json and benchmarks/results/model.md.
Run: ``python benchmarks/model.py [--steps 3] [--batch 2] [--seq 256] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ must not be on the path: its kernels.py / tokenizers.py would shadow the packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from megatron_vpmoe.config.schema import ModelConfig  # noqa: E402
from megatron_vpmoe.model import VpmoeModel  # noqa: E402
from megatron_vpmoe.model.params import count_parameters  # noqa: E402
from megatron_vpmoe.utils.atomic import atomic_file  # noqa: E402

MOE = ModelConfig(vocab_size=8192, hidden_size=384, num_layers=8, num_attention_heads=6,
                  num_query_groups=2, kv_channels=64, ffn_hidden_size=1536, window_size=128,
                  num_moe_experts=16, moe_router_topk=2, moe_ffn_hidden_size=384,
                  moe_shared_expert_intermediate_size=384, moe_router_num_groups=4,
                  moe_router_group_topk=2)


def dense_peer(moe: ModelConfig) -> ModelConfig:
    """Dense model (every layer an MLP) whose total params equal the MoE's active params."""
    target = count_parameters(moe).active
    base = replace(moe, num_moe_experts=0, ffn_hidden_size=1)
    per_unit = count_parameters(replace(base, ffn_hidden_size=2)).total - count_parameters(base).total
    ffn = 1 + round((target - count_parameters(base).total) / per_unit)
    return replace(base, ffn_hidden_size=ffn)


def tokens_per_second(model, batch: int, seq: int, steps: int) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq), generator=g)
    for step in range(steps + 1):  # first step is warm-up
        if step == 1:
            start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).mean().backward()
    return batch * seq * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    moe = VpmoeModel(MOE)
    dense = VpmoeModel(dense_peer(MOE))
    moe_tps = tokens_per_second(moe, args.batch, args.seq, args.steps)
    dense_tps = tokens_per_second(dense, args.batch, args.seq, args.steps)
    for layer in moe.moe_layers():
        layer.experts.forward = layer.experts.forward_loop  # the per-expert Python loop peer
    loop_tps = tokens_per_second(moe, args.batch, args.seq, args.steps)
    counts = count_parameters(MOE)
    result = {
        "device": "cpu", "threads": args.threads, "batch": args.batch, "seq": args.seq,
        "steps": args.steps,
        "moe": {"total_params": counts.total, "active_params": counts.active,
                "tokens_per_s": moe_tps},
        "dense_same_active": {"total_params": count_parameters(dense.cfg).total,
                              "ffn_hidden_size": dense.cfg.ffn_hidden_size, "tokens_per_s": dense_tps},
        "moe_expert_loop": {"tokens_per_s": loop_tps},
        "ratio_moe_over_dense": moe_tps / dense_tps,
        "ratio_grouped_over_loop": moe_tps / loop_tps,
    }
    out = ROOT / "benchmarks" / "results"
    with atomic_file(out / "model.json") as f:
        json.dump(result, f, indent=2)
    md = (f"# model benchmark (CPU, {args.threads} threads, batch {args.batch} x seq {args.seq}, "
          f"fwd+bwd, {args.steps} timed steps)\n\n"
          f"| model | params (total / active) | tokens/s |\n|---|---|---|\n"
          f"| VPMoE, grouped GEMM | {counts.total / 1e6:.1f}M / {counts.active / 1e6:.1f}M | {moe_tps:.0f} |\n"
          f"| dense, same active params | {result['dense_same_active']['total_params'] / 1e6:.1f}M | {dense_tps:.0f} |\n"
          f"| VPMoE, per-expert Python loop | same as VPMoE | {loop_tps:.0f} |\n\n"
          f"MoE / dense: {result['ratio_moe_over_dense']:.2f}x; grouped GEMM / loop: "
          f"{result['ratio_grouped_over_loop']:.2f}x\n")
    with atomic_file(out / "model.md") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
