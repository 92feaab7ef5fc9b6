"""Benchmark: forward+backward tokens/s of a ~50M-parameter VPMoE on CPU, against peers in the same run.

Part ``moe``: peers (1) a dense model with the same active parameter count per token, (2) the same MoE
with its routed experts computed by a Python loop over experts instead of one grouped GEMM;
writes benchmarks/results/model.json and model.md. Part ``attention``: GQA vs TPA local layers at
equal width (same heads, head dim, hidden size): training and KV-cache decoding tokens/s, KV-cache
bytes per token (measured from the cache), and the share of TPA's factor-expansion matmuls in a
TPA layer's forward+backward; writes benchmarks/results/model_attention.json and .md.
Run: ``python benchmarks/model.py [--part all|moe|attention] [--steps 3] [--batch 2] [--seq 256] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
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
from megatron_vpmoe.model.layers import KVCache, local_linear_spec  # noqa: E402
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


def best_tokens_per_second(model, batch: int, seq: int, steps: int) -> float:
    """Tokens/s of the fastest of ``steps`` fwd+bwd steps after a warm-up (least disturbed by other load)."""
    ids = torch.randint(0, model.cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for step in range(steps + 1):
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).mean().backward()
        if step:
            best = min(best, time.perf_counter() - start)
    return batch * seq / best


@torch.no_grad()
def decode(model, batch: int, prompt: int, new: int):
    """Decoding tokens/s with the KV cache, and the cache's bytes per token per layer kind."""
    model.eval()
    ids = torch.randint(0, model.cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.cfg.num_layers)
    logits = model(ids, cache=cache)[:, -1]
    best = float("inf")  # the fastest decoding step (least disturbed by other load)
    for t in range(new):
        start = time.perf_counter()
        nxt = logits.argmax(-1, keepdim=True)
        logits = model(nxt, position_ids=torch.full((batch, 1), prompt + t), cache=cache)[:, -1]
        best = min(best, time.perf_counter() - start)
    tps = batch / best
    model.train()
    row = {kind: sum(t[0, 0].numel() * t.element_size() for i, e in enumerate(cache.entries)
                     if e is not None and model.cfg.is_global_layer(i) == (kind == "global") for t in e)
           for kind in ("local", "global")}
    n_local = sum(1 for i in range(model.cfg.num_layers) if not model.cfg.is_global_layer(i))
    return tps, {"per_token_all_layers": cache.bytes_per_token(), "per_token_per_local_layer": row["local"] / n_local,
                 "per_token_global_layers": row["global"]}


def expansion_share(cfg: ModelConfig, batch: int, seq: int, steps: int) -> dict:
    """Share of TPA's factor expansions (the batched matmuls ``[B*S, H, R] @ [B*S, R, D]`` and their
    backward, told apart from the attention core's by their batch of ``B*S``) in one TPA layer's
    forward+backward CPU time, from the profiler over ``steps`` runs (layer 1: value factors of rank
    2 x R_KV after the value-residual mix). A ratio within one profile, so other load on the host
    scales both sides."""
    from torch.profiler import ProfilerActivity, profile

    from megatron_vpmoe.model.tpa import TensorProductAttention

    layer = TensorProductAttention(cfg, 1, local_linear_spec())
    x = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    pos = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    v_first = torch.randn(batch, seq, cfg.tpa_kv_rank, cfg.num_attention_heads + cfg.kv_channels)
    layer(x, pos, v_first)[0].sum().backward()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            layer(x, pos, v_first)[0].sum().backward()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    expand = sum(e.self_cpu_time_total for e in events if e.key in ("aten::bmm", "aten::mm")
                 and e.input_shapes and e.input_shapes[0] and e.input_shapes[0][0] == batch * seq
                 and len(e.input_shapes[0]) == 3)
    return {"tpa_layer_fwd_bwd_cpu_s": total / 1e6 / steps, "expansions_fwd_bwd_cpu_s": expand / 1e6 / steps,
            "share": expand / total}


def design_cache_bytes(path: Path) -> dict:
    """KV-cache bytes per token per local layer of a design config (bf16), from its dimensions."""
    from megatron_vpmoe.config.loader import load_config

    m = load_config(str(path)).model
    h, d, g, r = m.num_attention_heads, m.kv_channels, m.num_query_groups, m.tpa_kv_rank
    gqa = 2 * g * d * 2
    tpa = (r + r * (2 if m.value_residual else 1)) * (h + d) * 2  # value factors double after the mix
    return {"gqa_bytes": gqa, "tpa_bytes": tpa, "tpa_bytes_without_value_residual": 2 * r * (h + d) * 2,
            "mha_bytes": 2 * h * d * 2, "tpa_over_gqa": tpa / gqa}


def attention_part(args) -> None:
    gqa_cfg = replace(MOE, local_global_pattern=[3, 1])
    tpa_cfg = replace(gqa_cfg, local_attention="tpa", tpa_q_rank=6, tpa_kv_rank=2)
    rows = {}
    for name, cfg in (("gqa", gqa_cfg), ("tpa", tpa_cfg)):
        torch.manual_seed(0)
        model = VpmoeModel(cfg)
        train_tps = best_tokens_per_second(model, args.batch, args.seq, args.steps)
        decode_tps, cache = decode(model, args.batch, args.seq, 32)
        rows[name] = {"params": count_parameters(cfg).total, "train_tokens_per_s": train_tps,
                      "decode_tokens_per_s": decode_tps, "kv_cache_bytes": cache}
    share = expansion_share(tpa_cfg, args.batch, args.seq, args.steps)
    locked = design_cache_bytes(ROOT / "examples" / "configs" / "vpmoe-locked.yaml")
    ratio = rows["tpa"]["kv_cache_bytes"]["per_token_per_local_layer"] / rows["gqa"]["kv_cache_bytes"]["per_token_per_local_layer"]
    load = os.getloadavg()[0]  # the machine is shared: a load above the thread count distorts tokens/s
    result = {"device": "cpu", "threads": args.threads, "batch": args.batch, "seq": args.seq, "steps": args.steps,
              "load_average_1min": load, "config": {"hidden": MOE.hidden_size, "heads": MOE.num_attention_heads, "kv_groups": MOE.num_query_groups,
                         "head_dim": MOE.kv_channels, "tpa_q_rank": 6, "tpa_kv_rank": 2, "dtype": "fp32"},
              **rows, "local_cache_ratio_tpa_over_gqa": ratio, "tpa_expansion": share, "locked_design_bf16": locked}
    out = ROOT / "benchmarks" / "results"
    with atomic_file(out / "model_attention.json") as f:
        json.dump(result, f, indent=2)
    g, t = rows["gqa"], rows["tpa"]
    md = (f"# GQA vs TPA local layers (CPU, {args.threads} threads, batch {args.batch} x seq {args.seq}; "
          f"hidden {MOE.hidden_size}, {MOE.num_attention_heads} heads x {MOE.kv_channels}, GQA {MOE.num_query_groups} "
          f"KV groups, TPA ranks Q 6 / KV 2, 3:1 local:global, fp32)\n\n"
          f"| local attention | params | train tokens/s (fwd+bwd, best step) | decode tokens/s (KV cache, best step) | "
          f"cache bytes/token per local layer | cache bytes/token, all layers |\n|---|---|---|---|---|---|\n"
          + "".join(f"| {n} | {r['params'] / 1e6:.1f}M | {r['train_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f} | "
                    f"{r['kv_cache_bytes']['per_token_per_local_layer']:.0f} | {r['kv_cache_bytes']['per_token_all_layers']} |\n"
                    for n, r in rows.items())
          + f"\nTPA / GQA cache per local layer: {ratio:.2f}x. TPA caches (R_K + R_V')(heads + head_dim) numbers per "
          f"token, R_V' = 2 R_V on layers that mix layer 0's values (value residual in factor form), vs GQA's "
          f"2 x groups x head_dim: TPA's cache wins over MHA ({2 * MOE.num_attention_heads * MOE.kv_channels * 4} bytes here), "
          f"not over GQA with few KV groups.\n\n"
          f"Locked design (vpmoe-locked.yaml, bf16) per local layer and token: GQA {locked['gqa_bytes']} B, TPA "
          f"{locked['tpa_bytes']} B ({locked['tpa_over_gqa']:.2f}x; {locked['tpa_bytes_without_value_residual']} B "
          f"without the value residual; MHA {locked['mha_bytes']} B).\n\n"
          f"TPA factor expansion (the batched matmuls of Q, K and V, fwd+bwd) takes {share['share']:.0%} of a TPA layer's "
          f"forward+backward CPU time (profiler, {share['expansions_fwd_bwd_cpu_s'] * 1e3:.1f} of "
          f"{share['tpa_layer_fwd_bwd_cpu_s'] * 1e3:.1f} ms per step): "
          f"{'not the bottleneck' if share['share'] < 0.3 else 'a large share'}.\n\n"
          f"1-minute load average at the end of the run: {load:.1f} on a shared machine ({args.threads} threads used); "
          f"above {args.threads} the tokens/s columns measure contention as much as the models.\n")
    with atomic_file(out / "model_attention.md") as f:
        f.write(md)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "moe", "attention"], default="all")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("all", "attention"):
        attention_part(args)
    if args.part in ("all", "moe"):
        moe_part(args)


def moe_part(args) -> None:
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
