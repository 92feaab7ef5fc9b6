"""Validate the planner on CPU: predicted per-rank peak memory vs measured peak RSS minus an idle process.

For each (config, layout), ``vpmoe train`` (1 process) or ``vpmoe launch local`` (gloo ranks)
runs 2 steps with ``log.memory_report: true``; every rank's measured peak RSS (VmHWM over the
whole run) minus the measured idle-process baseline (python + torch + megatron-core imported,
a gloo process group made) is set beside ``vpmoe plan``'s prediction for its pipeline rank
(``--gpu cpu``: reference kernels, no framework overhead), and the parameter / gradient /
optimizer bytes of the live shard beside the planner's. Target: within +-15%, bytes exact.

Writes benchmarks/results/plan.json and plan.md. Run: ``python benchmarks/plan.py``
(``--quick`` runs the tiny config only; ``--only NAME...`` re-measures some cases and keeps
the others' results). Takes about 9 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
# A fixed mmap threshold turns off glibc's dynamic one, so every tensor buffer above 64 KiB is its
# own mapping, returned to the kernel when freed: RSS then follows live tensor bytes (as a GPU
# allocator's "allocated" counter does) instead of heap that glibc keeps after frees. The
# "default malloc" cases run without it and show that retention.
ENV_DEFAULT = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
ENV = dict(ENV_DEFAULT, MALLOC_MMAP_THRESHOLD_="65536")
TINY = ROOT / "examples" / "configs" / "tiny-cpu.yaml"
MEDIUM = ROOT / "examples" / "configs" / "medium-cpu.yaml"
MB = 2**20
# (name, config, processes, layout overrides); names ending "default malloc" run under ENV_DEFAULT
CASES = [
    ("tiny 1 process, default malloc", TINY, 1, {}),
    ("medium 1 process, default malloc", MEDIUM, 1, {}),
    ("tiny 1 process", TINY, 1, {}),
    ("tiny 1 process, recompute full", TINY, 1, {"train.recompute": "full"}),
    ("tiny TP=2", TINY, 2, {"parallel.tensor": 2}),
    ("tiny EP=2", TINY, 2, {"parallel.expert": 2}),
    ("tiny PP=2", TINY, 2, {"parallel.pipeline": 2}),
    ("tiny PP=2, recompute selective", TINY, 2, {"parallel.pipeline": 2, "train.recompute": "selective"}),
    ("medium 1 process", MEDIUM, 1, {}),
    ("medium 1 process, recompute full", MEDIUM, 1, {"train.recompute": "full"}),
    ("medium TP=2", MEDIUM, 2, {"parallel.tensor": 2}),
    ("medium EP=2", MEDIUM, 2, {"parallel.expert": 2}),
    ("medium PP=2", MEDIUM, 2, {"parallel.pipeline": 2}),
    ("medium EP=4 x PP=2", MEDIUM, 8, {"parallel.expert": 4, "parallel.pipeline": 2}),
]
COMMON = {"train.steps": 2, "train.global_batch_size": 8, "train.micro_batch_size": 2, "data.mock": "true",
          "data.seq_length": 128, "log.memory_report": "true", "checkpoint.interval": 0, "train.eval_interval": 0,
          "train.precision": "fp32", "log.progress_bar": "false", "train.schedule.warmup_steps": 1,
          "data.tokenizer": "null", "data.blend": "[]"}


IDLE = """
import os, sys, tempfile, torch, torch.distributed as dist
import megatron_vpmoe.training.trainer, megatron_vpmoe.training.checkpoint, megatron.core.parallel_state
import torch.distributed.checkpoint, torch.distributed.pipelining
from megatron_vpmoe.config.loader import load_config
from megatron_vpmoe.data.dataset import build_datasets
from megatron_vpmoe.training import batches
from megatron_vpmoe.utils.memory import peak_rss_bytes
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
dist.init_process_group("gloo", rank=0, world_size=1)
x = torch.randn(64, 64, requires_grad=True)
(x @ x).sum().backward()  # the autograd engine and the BLAS library initialised, nothing model-sized
cfg = load_config(sys.argv[1], sys.argv[2:])
t = cfg.train
with tempfile.TemporaryDirectory() as cache:  # the run's data pipeline: datasets, sampler, one step's batches
    train, _, _ = build_datasets(cfg.data, seed=cfg.run.seed, num_samples=(t.steps * t.global_batch_size, 1, 1),
                                 eod_id=0, pad_id=0, cache_dir=cache, vocab_size=cfg.model.vocab_size)
    sampler = batches.GlobalBatchSampler(len(train), t.global_batch_size, t.micro_batch_size, 0, 1)
    loader = iter(batches.micro_batch_loader(train, sampler, 0, t.steps))
    step = [next(loader) for _ in range(sampler.accumulation_steps)]
    print(peak_rss_bytes() / 2**20)
"""


def idle_baseline_mb(env, config: Path, sets: dict) -> float:
    """Peak RSS of an idle training process: python + torch + the trainer's modules and
    megatron-core imported, a gloo process group made, one tiny backward run, and the run's
    data pipeline built (datasets, sampler, one step's micro-batches), but no model."""
    out = subprocess.run([sys.executable, "-c", IDLE, str(config), *(f"{k}={v}" for k, v in sets.items())],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"idle baseline failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def run_case(name, config, nproc, overrides, tmp: Path) -> dict:
    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.plan.layouts import from_config
    from megatron_vpmoe.plan.memory import rank_memory

    sets = {**COMMON, **overrides, "run.dir": str(tmp / name.replace(" ", "_").replace(",", ""))}
    flags = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    if nproc == 1:
        cmd = [sys.executable, "-m", "megatron_vpmoe.cli", "train", "--config", str(config), "--quiet", *flags]
    else:
        cmd = [sys.executable, "-m", "megatron_vpmoe.cli", "launch", "local", "--nproc", str(nproc),
               "--config", str(config), *flags]
    t0 = time.perf_counter()
    env = ENV_DEFAULT if name.endswith("default malloc") else ENV
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    cfg = load_config(config, [f"{k}={v}" for k, v in sets.items()])
    layout = from_config(cfg, nproc)
    ranks = []
    for path in sorted((Path(sets["run.dir"]) / "memory").glob("rank_*.json")):
        rec = json.loads(path.read_text())
        pp_rank = rec["rank"] // (nproc // layout.pp)
        pred = rank_memory(cfg, layout, pp_rank, "reference", staging_on_device=True)
        shard = rec["shard"]
        phases = {k: v["peak_mb"] for k, v in rec["phases"].items()}
        train = {k: v for k, v in pred.moments.items() if k != "checkpoint_save"}
        ranks.append({"rank": rec["rank"], "pp_rank": pp_rank, "measured_peak_mb": rec["process_peak_mb"],
                      "measured_train_peak_mb": max(phases[k] for k in ("construction", "first_step", "step")),
                      "measured_save_peak_mb": phases["checkpoint_save"], "phases": phases,
                      "predicted_mb": max(train.values()) / MB, "predicted_moment": max(train, key=train.get),
                      "predicted_save_mb": pred.moments["checkpoint_save"] / MB,
                      "predicted_components_mb": {k: v / MB for k, v in pred.components().items()},
                      "params_mb": shard["params_mb"], "predicted_params_mb": pred.parameters / MB,
                      "grads_mb": shard["grads_mb"], "predicted_grads_mb": pred.gradients / MB,
                      "optimizer_mb": shard["optimizer_state_mb"], "predicted_optimizer_mb": pred.optimizer / MB})
    return {"name": name, "config": str(config.relative_to(ROOT)), "processes": nproc, "layout": layout.short(),
            "ranks": ranks, "wall_s": wall, "idle_mb": idle_baseline_mb(env, config, sets)}


def _markdown(res: dict) -> str:
    lines = ["# Capacity planner vs measurement on CPU (benchmarks/plan.py)", "",
             f"Host: {platform.machine()}, {os.cpu_count()} cores; gloo; fp32; 2 steps, global batch 8, micro-batch 2, "
             "sequence 128, mock data. Measured = the rank's peak RSS minus an idle training process's (python + "
             "torch + the trainer's modules and megatron-core imported, a gloo group made, one tiny backward, the run's "
             "data pipeline built and one step's micro-batches drawn; no model), measured per case. Runs use "
             "`MALLOC_MMAP_THRESHOLD_=65536` so RSS follows live tensor bytes; the 'default malloc' rows show glibc's "
             "retained heap on top. "
             "Predicted = `vpmoe plan --gpu cpu` for the rank's pipeline stage. Target: within +-15%; "
             "parameter / gradient / optimizer bytes equal to the live shard's.", "",
             "Training peak = construction and steps; the checkpoint save is shown apart (the EP=2 and EP=4 x PP=2 "
             "rows were re-measured with sharded saves, each rank writing its own shards; the other rows' save "
             "columns were measured while a save still gathered the model on every rank).", "",
             "| case | layout | idle MB | rank (pp) | training peak - idle MB | predicted MB (moment) | error | "
             "save peak - idle MB | predicted save MB | params/grads/optim bytes exact |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case in res["cases"]:
        for r in case["ranks"]:
            meas = r["measured_train_peak_mb"] - case["idle_mb"]
            save = r["measured_save_peak_mb"] - case["idle_mb"]
            exact = all(abs(r[k] - r["predicted_" + k]) < 1e-9 for k in ("params_mb", "grads_mb", "optimizer_mb"))
            lines.append(f"| {case['name']} | {case['layout']} | {case['idle_mb']:.0f} | {r['rank']} ({r['pp_rank']}) | {meas:.0f} | "
                         f"{r['predicted_mb']:.0f} ({r['predicted_moment']}) | {(r['predicted_mb'] - meas) / meas:+.1%} | "
                         f"{save:.0f} | {r['predicted_save_mb']:.0f} | {'yes' if exact else 'NO'} |")
    errs = [abs(r["predicted_mb"] - (r["measured_train_peak_mb"] - c["idle_mb"])) / (r["measured_train_peak_mb"] - c["idle_mb"])
            for c in res["cases"] for r in c["ranks"] if not c["name"].endswith("default malloc")]
    within = sum(e <= 0.15 for e in errs)
    lines += ["", f"Fixed mmap threshold: {within} of {len(errs)} ranks within +-15% (largest error {max(errs):.1%})."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the tiny config only")
    ap.add_argument("--only", nargs="+", help="case names to run (default all)")
    args = ap.parse_args()
    cases = [c for c in CASES if (not args.quick or c[1] == TINY) and (not args.only or c[0] in args.only)]
    res = {"cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            res["cases"].append(run_case(*case, Path(tmp)))
            print(f"{case[0]}: {res['cases'][-1]['wall_s']:.0f} s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.only and (RESULTS / "plan.json").is_file():  # re-measure some cases, keep the others
        old = {c["name"]: c for c in json.loads((RESULTS / "plan.json").read_text())["cases"]}
        old.update({c["name"]: c for c in res["cases"]})
        res["cases"] = [old[name] for name, *_ in CASES if name in old]
    (RESULTS / "plan.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "plan.md").write_text(_markdown(res) + "\n")
    print(_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
