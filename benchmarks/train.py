"""Training throughput and peak memory of the tiny and small configs on CPU.

One thread (``BENCH_THREADS``; the 2-core CI host is shared). For each config, two measurements in fresh subprocesses (so peak RSS is per measurement):
``trainer`` runs ``vpmoe train``'s loop (Trainer: role-aware loss, clipping, schedule, expert
bias update, metrics, a final checkpoint) on random tokens; ``bare`` is the peer: the same model
and AdamW in a minimal loop (``model(ids, labels=labels).mean().backward(); opt.step()``). The
ratio trainer/bare is the loop's overhead. The first steps are warm-up and not timed; the two
are run alternately ``--repeats`` times and the best of each is kept (the host is shared).

Writes benchmarks/results/train.json and train.md. Run: ``python benchmarks/train.py``
(``--steps N``, ``--configs tiny small``).
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
# benchmarks/ must not be on the path: its kernels.py / tokenizers.py would shadow the packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
CONFIGS = {
    "tiny": ("examples/configs/tiny-cpu.yaml", {"data.seq_length": 128, "train.global_batch_size": 8,
                                                "train.micro_batch_size": 4}),
    "small": ("examples/configs/small.yaml", {"data.seq_length": 256, "train.global_batch_size": 4,
                                              "train.micro_batch_size": 2}),
}
DEFAULT_STEPS = {"tiny": 20, "small": 5}  # timed steps per config (--steps overrides)
WARMUP = 2


def _measure(kind: str, name: str, steps: int, run_dir: str) -> dict:
    """Runs inside the subprocess."""
    import resource

    import torch

    from megatron_vpmoe.config.loader import load_config

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    path, overrides = CONFIGS[name]
    sets = [f"{k}={v}" for k, v in overrides.items()] + [
        f"run.dir={run_dir}", "data.mock=true", "data.tokenizer=null", f"train.steps={steps + WARMUP}",
        "train.precision=fp32", "train.eval_interval=0", "checkpoint.interval=0", "log.progress_bar=false",
        "train.schedule.warmup_steps=0"]
    cfg = load_config(ROOT / path, sets)
    seq, gbs = cfg.data.seq_length, cfg.train.global_batch_size
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.model.vocab_size, (gbs * (steps + WARMUP), seq + 1), generator=generator)

    class RandomTokens(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {"tokens": data[i, :-1], "labels": data[i, 1:],
                    "loss_mask": torch.full((seq,), 3, dtype=torch.uint8), "position_ids": torch.arange(seq)}

    tokens_per_step = gbs * seq
    extra = {}
    if kind == "trainer":
        from megatron_vpmoe.training.trainer import Trainer

        trainer = Trainer(cfg, datasets=(RandomTokens(), RandomTokens()), quiet=True)
        trainer.run(stop_at_step=WARMUP)  # warm-up (also writes a checkpoint)
        t0 = time.perf_counter()
        trainer.run()
        wall = time.perf_counter() - t0  # includes the final checkpoint save and the summary
        records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        elapsed = sum(r["step_time_s"] for r in records if r["kind"] == "train" and r["step"] > WARMUP)
        extra = {"tokens_per_s_incl_checkpoint": steps * tokens_per_step / wall}
    else:
        from megatron_vpmoe.model import VpmoeModel
        from megatron_vpmoe.training.optimizer import build_optimizer

        torch.manual_seed(cfg.run.seed)  # the trainer's initialisation, so both route alike
        model = VpmoeModel(cfg.model)
        opt = build_optimizer(model, cfg.train.optimizer)
        mbs = cfg.train.micro_batch_size
        elapsed = 0.0
        for step in range(steps + WARMUP):
            t0 = time.perf_counter()
            for m in range(gbs // mbs):
                rows = data[step * gbs + m * mbs: step * gbs + (m + 1) * mbs]
                model(rows[:, :-1], labels=rows[:, 1:]).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= WARMUP:
                elapsed += time.perf_counter() - t0
    return {"tokens_per_s": steps * tokens_per_step / elapsed, "step_s": elapsed / steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "tokens_per_step": tokens_per_step, "seq_length": seq, "global_batch_size": gbs, **extra}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 tiny, 5 small)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each; best kept")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--_child", nargs=3, metavar=("KIND", "NAME", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        kind, name, steps = args._child
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(_measure(kind, name, int(steps), tmp)))
        return 0

    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.model.params import count_parameters

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("BENCH_THREADS", "1"))
    results = {"host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "configs": {}}
    for name in args.configs:
        steps = args.steps or DEFAULT_STEPS[name]
        counts = count_parameters(load_config(ROOT / CONFIGS[name][0]).model)
        entry = {"total_params": counts.total, "active_params": counts.active, "steps_timed": steps}
        for _ in range(args.repeats):  # alternate the two, keep the best of each (a shared host drifts)
            for kind in ("bare", "trainer"):
                out = subprocess.run([sys.executable, __file__, "--_child", kind, name, str(steps)],
                                     cwd=ROOT, env=env, capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr, file=sys.stderr)
                    return 1
                got = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{name:6s} {kind:8s} {got['tokens_per_s']:9.0f} tokens/s  "
                      f"peak RSS {got['peak_rss_mb']:7.0f} MB", flush=True)
                if kind not in entry or got["tokens_per_s"] > entry[kind]["tokens_per_s"]:
                    entry[kind] = got
        entry["trainer_over_bare_tokens_per_s"] = entry["trainer"]["tokens_per_s"] / entry["bare"]["tokens_per_s"]
        results["configs"][name] = entry
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(results, indent=1) + "\n")
    timed = ", ".join(f"{n}: {e['steps_timed']}" for n, e in results["configs"].items())
    lines = ["# Training throughput on CPU (`benchmarks/train.py`)", "",
             f"{results['host']['cpus']} CPUs (1 thread), fp32, {timed} timed steps after {WARMUP} warm-up steps, "
             f"best of {args.repeats} alternating runs, random tokens. `bare` = the same model + AdamW in a minimal loop (the peer); "
             "`trainer` = `vpmoe train`'s loop (step time from metrics.jsonl; the last column adds "
             "the end-of-run checkpoint save to the wall time).", "",
             "| config | params total / active | seq x global batch | bare tokens/s | trainer tokens/s | trainer/bare | peak RSS bare / trainer | trainer tokens/s incl. checkpoint |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in results["configs"].items():
        t, b = e["trainer"], e["bare"]
        lines.append(f"| {name} | {e['total_params']/1e6:.1f}M / {e['active_params']/1e6:.1f}M | "
                     f"{t['seq_length']} x {t['global_batch_size']} | {b['tokens_per_s']:.0f} | "
                     f"{t['tokens_per_s']:.0f} | {e['trainer_over_bare_tokens_per_s']:.2f} | "
                     f"{b['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} MB | {t['tokens_per_s_incl_checkpoint']:.0f} |")
    (RESULTS / "train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
