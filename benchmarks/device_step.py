"""Benchmark: training steps of a config on this host's device, measured against the planner's prediction.

Runs ``vpmoe train`` (mock data, no checkpoints) once per variant in a fresh process —
``bf16`` (Triton kernels on a GPU), ``bf16-autocast`` (the old precision path, ``train.master_weights:
false``), ``bf16-reference`` (the same with ``VPMOE_DISABLE_TRITON=1``,
so the kernels' end-to-end effect is a ratio within one run) and ``fp32`` — and reads each run's
``metrics.jsonl``: first-step loss, median step time and tokens/s after the warm-up steps, MFU and
peak device memory (GPU: ``max_memory_allocated``; CPU: peak RSS). Beside them it prints the
planner's prediction for the same config and layout (``vpmoe plan --json``), so the planner's memory
and throughput model meets a measurement.

Writes benchmarks/results/<--name, default device_step>_<cuda|cpu>.{json,md}.
Run: ``python benchmarks/device_step.py [--config examples/configs/medium-cpu.yaml] [--steps 12]
[--seq 2048] [--variants bf16,bf16-reference,fp32]``; ``benchmarks/device_check.sh`` runs it on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ must not be on the path: its kernels.py / tokenizers.py would shadow the packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_vpmoe.utils.atomic import atomic_file  # noqa: E402

VARIANTS = {
    "bf16": ({"train.precision": "bf16"}, {}),  # bf16 working weights over the fp32 master, cast once a step
    "bf16-autocast": ({"train.precision": "bf16", "train.master_weights": "false"}, {}),  # the old path: fp32
    # weights cast under autocast at every use, every micro-batch
    "bf16-reference": ({"train.precision": "bf16"}, {"VPMOE_DISABLE_TRITON": "1"}),
    "fp32": ({"train.precision": "fp32"}, {}),
}


def shape_overrides(args) -> dict:
    extra = dict(kv.split("=", 1) for kv in args.set)
    return {**extra, "data.mock": "true", "data.seq_length": str(args.seq), "train.steps": str(args.steps),
            "train.global_batch_size": str(args.gbs), "train.micro_batch_size": str(args.mbs),
            "train.eval_interval": "0", "checkpoint.interval": "0", "log.interval": "1",
            "log.progress_bar": "false", "log.memory_report": "false"}


def _sets(overrides: dict) -> list:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def run_variant(args, name: str, workdir: Path) -> dict:
    """One ``vpmoe train`` process; its steps' metrics summarised (or the failure's tail)."""
    sets, env_extra = VARIANTS[name]
    run_dir = workdir / name
    overrides = {**shape_overrides(args), **sets, "run.dir": str(run_dir)}
    cmd = [sys.executable, "-m", "megatron_vpmoe.cli", "train", "--config", args.config, *_sets(overrides)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_extra)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-3000:]
    wall = time.perf_counter() - t0
    rows = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") == "train"]
    out = {"variant": name, "rc": rc, "wall_s": round(wall, 1), "steps_logged": len(rows)}
    if rc != 0:
        out["error_tail"] = tail
    if not rows:
        return out
    steady = rows[args.warmup:] or rows[-1:]
    peak = max(r.get("gpu_max_allocated_mb", r.get("peak_memory_mb_max", 0.0)) for r in rows)
    out.update({
        "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
        "first_step_s": rows[0]["step_time_s"],
        "median_step_s": statistics.median(r["step_time_s"] for r in steady),
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "median_mfu": (statistics.median(r["mfu"] for r in steady) if all(r.get("mfu") is not None for r in steady)
                       else None),
        "median_tflops": statistics.median(r.get("tflops_per_gpu") or 0.0 for r in steady),
        "peak_memory_mb": peak,
        "gpu_max_reserved_mb": max((r.get("gpu_max_reserved_mb", 0.0) for r in rows), default=0.0),
        "nonfinite_steps": sum(bool(r.get("skipped")) for r in rows),
    })
    return out


def planner_prediction(args, gpu: str) -> dict:
    """``vpmoe plan --json`` for the same config, shapes and a single-rank layout."""
    overrides = {**shape_overrides(args), "train.precision": "bf16"}
    cmd = [sys.executable, "-m", "megatron_vpmoe.cli", "plan", "--config", args.config, *_sets(overrides),
           "--gpu", gpu, "--nodes", "1", "--gpus-per-node", "1",
           "--layout", f"tp=1,ep=1,pp=1,mb={args.mbs},recompute=none", "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode not in (0, 1):
        return {"error": (proc.stdout + proc.stderr)[-1000:]}
    plan = json.loads(proc.stdout)
    rank = plan["ranks"][0]
    comp = rank["components"]
    # no checkpoints are saved, so the step's peak is the backward moment; on a GPU the measurement
    # (max_memory_allocated) sees tensors only, not the CUDA context the planner's framework term holds
    step_peak = rank["moments"]["backward"] - (comp.get("framework", 0) if gpu != "cpu" else 0)
    return {"gpu": plan["gpu"], "peak_bytes": plan["peak_bytes"], "step_peak_bytes": step_peak,
            "components": comp, "tokens_per_s_per_gpu": plan["tokens_per_s_per_gpu"], "mfu": plan["mfu"]}


def render_markdown(res: dict) -> str:
    lines = [f"# Training steps on {res['device_name']}", "",
             f"Config `{res['config']}`, mock data, seq {res['seq']}, global batch {res['gbs']}, micro-batch "
             f"{res['mbs']}{''.join(', ' + o for o in res.get('overrides', []))}, {res['steps']} steps (medians over steps after the first {res['warmup']}); "
             f"torch {res['torch']}.", "",
             "| variant | rc | first loss | median step s | tokens/s | TFLOP/s | MFU | peak memory MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        if "median_step_s" not in r:
            lines.append(f"| {r['variant']} | {r['rc']} | - | - | - | - | - | - |")
            continue
        mfu = f"{r['median_mfu']:.1%}" if r.get("median_mfu") is not None else "-"
        lines.append(f"| {r['variant']} | {r['rc']} | {r['first_loss']:.4f} | {r['median_step_s']:.3f} | "
                     f"{r['median_tokens_per_s']:,.0f} | {r['median_tflops']:.1f} | {mfu} | {r['peak_memory_mb']:,.0f} |")
    by = {r["variant"]: r for r in res["runs"] if "median_step_s" in r}
    if "bf16" in by and "bf16-reference" in by:
        lines += ["", f"Triton kernels end to end: bf16 step time {by['bf16']['median_step_s'] / by['bf16-reference']['median_step_s']:.2f}x "
                  "of the same step with the PyTorch reference ops (lower is faster)."]
    if "bf16" in by and "fp32" in by:
        lines.append(f"bf16 vs fp32: step time {by['bf16']['median_step_s'] / by['fp32']['median_step_s']:.2f}x, "
                     f"first-step loss differs by {abs(by['bf16']['first_loss'] - by['fp32']['first_loss']):.4f}.")
    plan = res.get("plan") or {}
    if "peak_bytes" in plan and "bf16" in by:
        measured = by["bf16"]["peak_memory_mb"] * 2**20
        what = "tensor peak (framework term left out)" if res["device"] == "cuda" else "step peak"
        lines += ["", f"Planner (`vpmoe plan --gpu {res['plan_gpu']}`, bf16): predicted {what} "
                  f"{plan['step_peak_bytes'] / 2**30:.2f} GiB (whole-rank peak with checkpoint staging "
                  f"{plan['peak_bytes'] / 2**30:.2f} GiB) vs measured {measured / 2**30:.2f} GiB "
                  f"({measured / plan['step_peak_bytes']:.2f}x); predicted {plan['tokens_per_s_per_gpu']:,.0f} "
                  f"tokens/s at MFU {plan['mfu']:.0%} vs measured {by['bf16']['median_tokens_per_s']:,.0f} "
                  f"({by['bf16']['median_tokens_per_s'] / plan['tokens_per_s_per_gpu']:.3f}x)."]
    for r in res["runs"]:
        if r.get("error_tail"):
            lines += ["", f"### {r['variant']} failed (rc {r['rc']})", "", "```", r["error_tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "configs" / "medium-cpu.yaml"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the medians (compilation, allocator)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--gbs", type=int, default=16)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--variants", default="bf16,bf16-reference,fp32")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the runs and the prediction alike (repeatable)")
    ap.add_argument("--name", default="device_step", help="results file stem (<name>_<device>.json/.md)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per variant's process")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    bad = [kv for kv in args.set if "=" not in kv]
    if bad:
        ap.error(f"--set: expected KEY=VALUE, got {bad[0]!r}")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    plan_gpu = "h200" if cuda and "H200" in device_name else ("h100-80gb" if cuda and "H100" in device_name else "cpu")
    res = {"device": "cuda" if cuda else "cpu", "device_name": device_name, "torch": torch.__version__,
           "config": os.path.relpath(args.config, ROOT), "seq": args.seq, "gbs": args.gbs, "mbs": args.mbs,
           "steps": args.steps, "warmup": args.warmup, "overrides": args.set, "plan_gpu": plan_gpu, "runs": []}
    try:
        res["plan"] = planner_prediction(args, plan_gpu)
    except Exception as e:  # the measurement stands without the prediction
        res["plan"] = {"error": f"{type(e).__name__}: {e}"}
    with tempfile.TemporaryDirectory(prefix="vpmoe-device-step-") as tmp:
        for name in args.variants.split(","):
            r = run_variant(args, name, Path(tmp))
            res["runs"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "error_tail"}), flush=True)
            if r.get("error_tail"):
                print(r["error_tail"], file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / f"{args.name}_{res['device']}.json") as f:
        json.dump(res, f, indent=2)
    with atomic_file(out / f"{args.name}_{res['device']}.md") as f:
        f.write(render_markdown(res))
    print(render_markdown(res))


if __name__ == "__main__":
    main()
