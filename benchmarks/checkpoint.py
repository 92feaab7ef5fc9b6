"""Checkpoint cost inside the training loop on CPU: synchronous vs asynchronous saves.

One process, one thread (``BENCH_THREADS``). The trainer runs a config on megatron-core's mock data and
saves every ``--interval`` steps, once with ``checkpoint.async_save: false`` and once with
``true`` (fresh subprocesses, alternated ``--repeats`` times, best kept). Reported per mode:
the median step time of steps that do not follow a save, the median step time of the step
right after a save (``after_save_ratio``: the async write runs in the background during it),
and how long ``save_checkpoint`` blocks the loop (the async save's first call allocates the
staging buffers; later calls only copy into them).

Writes benchmarks/results/checkpoint.json and checkpoint.md. Run: ``python benchmarks/checkpoint.py``
(``--config tiny|small`` at sequence 128 x batch 8, ``--steps N``, ``--interval K``).
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
RESULTS = ROOT / "benchmarks" / "results"
# like every benchmark: benchmarks/ off the path (its kernels.py / tokenizers.py shadow packages)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
CONFIGS = {"tiny": "examples/configs/tiny-cpu.yaml", "small": "examples/configs/small.yaml"}
BATCH = ["data.seq_length=128", "train.global_batch_size=8", "train.micro_batch_size=4"]


def _measure(async_save: bool, name: str, steps: int, interval: int, run_dir: str) -> dict:
    """Runs inside the subprocess."""
    import torch

    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.training.trainer import Trainer

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    sets = BATCH + [
        f"run.dir={run_dir}", "data.mock=true", "data.tokenizer=null", f"train.steps={steps}",
        "train.precision=fp32", "train.eval_interval=0", f"checkpoint.interval={interval}",
        f"checkpoint.async_save={str(async_save).lower()}", "checkpoint.keep_last=2",
        "log.progress_bar=false", "train.schedule.warmup_steps=0"]
    cfg = load_config(ROOT / CONFIGS[name], sets)
    trainer = Trainer(cfg, quiet=True)  # megatron-core's mock dataset (data.mock)
    blocking = []
    save = trainer.save_checkpoint

    def timed_save():
        t0 = time.perf_counter()
        out = save()
        blocking.append(time.perf_counter() - t0)
        return out

    trainer.save_checkpoint = timed_save
    assert trainer.run() == 0
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["step_time_s"] for r in records if r["kind"] == "train"}
    after = [t for s, t in times.items() if s > 1 and (s - 1) % interval == 0]
    normal = [t for s, t in times.items() if s > 2 and (s - 1) % interval != 0]
    state_mb = sum(t.numel() * t.element_size() for t in trainer.raw_model.state_dict().values()
                   if isinstance(t, torch.Tensor)) * 3 / 2**20  # weights + AdamW's two moments
    return {"normal_step_s": statistics.median(normal), "after_save_step_s": statistics.median(after),
            "after_save_ratio": statistics.median(after) / statistics.median(normal),
            "save_blocking_s_first": blocking[0], "save_blocking_s_later": statistics.median(blocking[1:-1]),
            "saves": len(blocking), "state_mb": state_mb}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each mode; best kept")
    parser.add_argument("--_child", nargs=4, metavar=("ASYNC", "NAME", "STEPS", "INTERVAL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        mode, name, steps, interval = args._child
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(_measure(mode == "async", name, int(steps), int(interval), tmp)))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("BENCH_THREADS", "1"))
    results = {"host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "config": args.config, "steps": args.steps, "interval": args.interval, "modes": {}}
    for _ in range(args.repeats):
        for mode in ("sync", "async"):
            out = subprocess.run([sys.executable, __file__, "--_child", mode, args.config, str(args.steps),
                                  str(args.interval)], cwd=ROOT, env=env, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return 1
            got = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{mode:5s} step {got['normal_step_s']:.3f}s, after a save {got['after_save_step_s']:.3f}s "
                  f"({got['after_save_ratio']:.2f}x), save blocks {got['save_blocking_s_later']:.3f}s "
                  f"(first {got['save_blocking_s_first']:.3f}s)", flush=True)
            best = results["modes"].get(mode)
            if best is None or got["after_save_ratio"] < best["after_save_ratio"]:
                results["modes"][mode] = got
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "checkpoint.json").write_text(json.dumps(results, indent=1) + "\n")
    rows = [f"| {m} | {r['state_mb']:.0f} | {r['normal_step_s']:.3f} | {r['after_save_step_s']:.3f} | "
            f"{r['after_save_ratio']:.2f}x | {r['save_blocking_s_first']:.3f} | {r['save_blocking_s_later']:.3f} |"
            for m, r in results["modes"].items()]
    (RESULTS / "checkpoint.md").write_text(
        f"# Checkpoint saves in the training loop ({args.config}, 1 process, 1 thread, every {args.interval} "
        f"steps)\n\n| mode | state MB | step s | step after a save s | ratio | save blocks s (first) | "
        f"save blocks s (later) |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
