"""``vpmoe plan``: whether and how a config fits N nodes x G GPUs (per-rank memory, tokens/s/GPU, MFU)."""

from __future__ import annotations

import argparse
import json

def register(subparsers: argparse._SubParsersAction) -> None:
    from megatron_vpmoe.utils.cli_args import add_config_args

    parser = subparsers.add_parser(
        "plan", help="capacity planner: per-rank memory, step time and the best layouts for N x G GPUs",
        description="Predict per-rank memory (by component, per pipeline stage), tokens/s/GPU and MFU of a config "
                    "on N nodes x G GPUs. With --layout: that layout (exit 1 if it is predicted not to fit); "
                    "without: search the valid layouts and print the fastest that fit and why the others do "
                    "not (exit 2 if none fits). Estimates until a GPU run exists; see docs/plan.md.")
    add_config_args(parser)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", default="h100-80gb", help="h100-80gb | h200 | a100-80gb | a100-40gb | gb200 | cpu (aliases: h100, a100, ...) | a spec YAML")
    parser.add_argument("--layout", help="tp=..,ep=..,pp=..,vpp=..,mb=..,recompute=none|selective|full[,zero=1] "
                                         "(unnamed keys from the config)")
    parser.add_argument("--efficiency", type=float, default=None,
                        help="replace the calibrated compute model (docs/plan.md) by this flat fraction of the "
                             "dense bf16 peak, for what-if estimates")
    parser.add_argument("--top", type=int, default=5, help="layouts to print in a search")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from megatron_vpmoe.plan.estimate import plan_layout
    from megatron_vpmoe.plan.gpu import load_gpu
    from megatron_vpmoe.plan.layouts import MAX_WORLD, check_layout, from_config, parse_layout
    from megatron_vpmoe.plan.search import require_fit, search
    from megatron_vpmoe.plan.table import gb, plan_table
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.utils.errors import UsageError

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise UsageError("--nodes and --gpus-per-node must be >= 1")
    if args.nodes * args.gpus_per_node > MAX_WORLD:
        raise UsageError(f"--nodes x --gpus-per-node = {args.nodes * args.gpus_per_node:,} GPUs exceeds the "
                         f"planner's limit of {MAX_WORLD:,}")
    if args.top < 1:
        raise UsageError(f"--top must be >= 1, got {args.top}")
    eff = args.efficiency
    if eff is not None and not 0 < eff <= 1:
        raise UsageError(f"--efficiency must be in (0, 1], got {eff}")
    gpu = load_gpu(args.gpu)
    cfg = load_config(args.config, args.overrides)
    world = args.nodes * args.gpus_per_node
    if args.layout is not None:
        layout = parse_layout(args.layout, replace(from_config(cfg, world), world=world))
        check_layout(cfg, layout)
        plan = plan_layout(cfg, layout, gpu, eff)
        print(json.dumps(plan.as_dict(), indent=1) if args.json else "\n".join(plan_table(plan)))
        return 0 if plan.fits else 1
    result = search(cfg, world, args.gpus_per_node, gpu, eff)
    require_fit(result, world, gpu)
    if args.json:
        print(json.dumps({"considered": result.considered, "top": [p.as_dict() for p in result.fitting[:args.top]],
                          "rejected": result.rejected}, indent=1))
        return 0
    print(f"{result.considered} layouts considered on {world} x {gpu.name}; {len(result.fitting)} fit. "
          f"Top {min(args.top, len(result.fitting))} by estimated tokens/s/GPU:")
    print("| # | layout | peak GB (pp rank) | tokens/s/GPU | MFU | step s |")
    print("|---|---|---|---|---|---|")
    for i, p in enumerate(result.fitting[:args.top], 1):
        print(f"| {i} | {p.layout.short()} | {gb(p.peak)} ({p.tight_rank.pp_rank}) | "
              f"{p.tokens_per_s_per_gpu:,.0f} | {p.mfu:.1%} | {p.step_s:.3g} |")
    print("\nBest layout:")
    print("\n".join(plan_table(result.fitting[0])))
    if result.rejected:
        print("\nRejected:")
        for text in result.rejected.values():
            print(f"- {text}")
    return 0
