"""Benchmark of the evaluation harness: bits-per-byte scoring (streamed sums vs per-token
results), batched vs one-at-a-time scoring, and KV-cached generation of the converted model.

Builds a small VPMoE (tiny-cpu shape, vocab 512), converts it to HF format in a temporary
directory, and times, in the same run:
- bits-per-byte scoring with the tiny-cpu config as shipped (vocab 8192, a BPE 8k tokenizer trained
  on the first 600 KB of Tiny Shakespeare; 3.3M parameters) of its last 212 KB (the issue's held-out size), each
  path in its own process so each has its own peak RSS: the old path (a frozen copy of what
  ``run_bits_per_byte`` did through ``Backend.score``: 8 windows a forward, each window's
  per-token log-probs (gather - logsumexp per window) and greedy flags kept, then summed) vs the
  new one (``eval.requests.document_nll``: ~4,096 tokens a forward, one chunked log-softmax
  (cross-entropy) per forward, per-window sums only);
  tokens/s, peak RSS and both NLLs (they must agree); and the model's forwards alone over the new
  path's batches (nothing scored: what no scoring change can beat); best of 2 alternated runs each, in wall-clock
  tokens/s and in tokens per CPU-second of the process (steadier on a shared machine);
- multiple-choice scoring (COPA, 64 items = 128 requests) at batch size 8 vs 1;
- greedy generation of 64 tokens for 4 prompts in one batch: the backend's ``generate`` (HF
  ``generate`` with the sliding-window ``DynamicCache``) vs the same call with ``use_cache=False``.
Writes benchmarks/results/eval.json and eval.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ must not be on the path: its kernels.py / tokenizers.py would shadow the packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _tokenizer(out: Path, shared: Path) -> None:
    from megatron_vpmoe.tokenizers.train import train_bpe

    train_bpe([(shared / "corpora" / "tinyshakespeare.txt").read_text()[:100_000]], 500).save(out)


BPB_BYTES = 212_000
BPB_REPEATS = 2
BPB_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[4])
import torch
torch.set_num_threads(1)
from megatron_vpmoe.eval.requests import document_nll, document_windows, score_rows
from megatron_vpmoe.inference import open_backend
backend = open_backend(sys.argv[2])
ids = backend.encode(open(sys.argv[3], encoding="utf-8").read())
windows = document_windows(backend, ids)
start, cpu = time.perf_counter(), time.process_time()
if sys.argv[1] == "old":  # the pre-streaming run_bits_per_byte, frozen here as it was (Backend.score before
    kept = []  # 6d21e4c): batch_size windows a forward, per-token log-probs and greedy flags of every window kept
    with torch.no_grad():
        for idx, logits in backend._forward_batches(windows, backend.batch_size):
            for row, i in enumerate(idx):
                row_logits, targets = logits[row, : len(windows[i]) - 1].float(), torch.tensor(windows[i][1:])
                lp = row_logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row_logits, dim=-1)
                kept.append((lp, row_logits.argmax(-1) == targets))
    nll = float(-torch.cat([lp for lp, _ in kept]).double().sum())
elif sys.argv[1] == "forward":  # the model alone, the new path's batches, nothing scored: a ceiling
    with torch.no_grad():
        for _ in backend._forward_batches(windows, score_rows(backend, max(map(len, windows)))):
            pass
    nll = float("nan")
else:
    nll = document_nll(backend, windows)
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"tokens": len(ids), "seconds": seconds, "cpu_seconds": cpu, "nll": nll,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _bpb_path(mode: str, hf: Path, text: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", BPB_CHILD, mode, str(hf), str(text), str(ROOT)], capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        raise SystemExit(f"bpb {mode} path failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    import torch

    from megatron_vpmoe.config import dump_config, load_config
    from megatron_vpmoe.convert.checkpoint_io import write_native_checkpoint
    from megatron_vpmoe.convert.to_hf import convert_to_hf
    from megatron_vpmoe.eval.tasks import run_multiple_choice
    from megatron_vpmoe.inference import SampleParams, open_backend
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.tokenizers.train import train_bpe
    from megatron_vpmoe.utils.atomic import atomic_write_text

    torch.set_num_threads(1)
    from megatron_vpmoe.utils.paths import data_dir

    shared = data_dir()  # $VPMOE_DATA, ../shared/data or the embedded default (all hold these files)
    results = {"threads": 1, "device": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _tokenizer(tmp / "tok", shared)
        cfg = load_config(ROOT / "examples" / "configs" / "tiny-cpu.yaml",
                          ["model.vocab_size=512", f"data.tokenizer={tmp / 'tok'}"])
        torch.manual_seed(0)
        write_native_checkpoint(tmp / "ckpt", VpmoeModel(cfg.model), 0, dump_config(cfg), source="benchmark")
        convert_to_hf(str(tmp / "ckpt"), str(tmp / "hf"), progress=False)
        text = tmp / "heldout.txt"
        corpus = (shared / "corpora" / "tinyshakespeare.txt").read_text(encoding="utf-8")
        raw = corpus.encode("utf-8")[-BPB_BYTES:]
        text.write_text(raw.decode("utf-8", errors="ignore"), encoding="utf-8")
        train_bpe([corpus[:600_000]], 8192).save(tmp / "tok8k")
        big = load_config(ROOT / "examples" / "configs" / "tiny-cpu.yaml", [f"data.tokenizer={tmp / 'tok8k'}"])
        torch.manual_seed(0)
        write_native_checkpoint(tmp / "ckpt8k", VpmoeModel(big.model), 0, dump_config(big), source="benchmark")
        convert_to_hf(str(tmp / "ckpt8k"), str(tmp / "hf8k"), progress=False)
        for _ in range(BPB_REPEATS):  # alternated, best of each: the machine's load drifts between runs
            for mode in ("new", "old", "forward"):
                run = _bpb_path(mode, tmp / "hf8k", text)
                speed = run["tokens"] / run["seconds"]
                results[f"bpb_{mode}_tokens_per_s"] = max(speed, results.get(f"bpb_{mode}_tokens_per_s", 0.0))
                results[f"bpb_{mode}_tokens_per_cpu_s"] = max(run["tokens"] / run["cpu_seconds"],
                                                              results.get(f"bpb_{mode}_tokens_per_cpu_s", 0.0))
                results[f"bpb_{mode}_peak_rss_mb"] = max(run["peak_rss_mb"], results.get(f"bpb_{mode}_peak_rss_mb", 0.0))
                results[f"bpb_{mode}_nll"] = run["nll"]
                results["bpb_tokens"], results["bpb_bytes"] = run["tokens"], len(raw)
        del results["bpb_forward_nll"]
        results["bpb_new_of_forward_only"] = results["bpb_new_tokens_per_s"] / results["bpb_forward_tokens_per_s"]
        results["bpb_speedup"] = results["bpb_new_tokens_per_s"] / results["bpb_old_tokens_per_s"]
        results["bpb_speedup_cpu"] = results["bpb_new_tokens_per_cpu_s"] / results["bpb_old_tokens_per_cpu_s"]
        results["bpb_new_of_forward_only_cpu"] = (results["bpb_new_tokens_per_cpu_s"]
                                                  / results["bpb_forward_tokens_per_cpu_s"])
        results["bpb_nll_abs_diff"] = abs(results["bpb_new_nll"] - results["bpb_old_nll"])
        results["bpb_abs_diff"] = results["bpb_nll_abs_diff"] / math.log(2) / len(raw)  # in bits per byte
        copa = shared / "eval" / "mc" / "copa.jsonl"
        for bs in (8, 1):
            backend = open_backend(str(tmp / "hf"), batch_size=bs)
            run_multiple_choice(backend, copa, 4)  # warm up
            start = time.perf_counter()
            run_multiple_choice(backend, copa, 64)
            results[f"mc_requests_per_s_batch{bs}"] = 128 / (time.perf_counter() - start)
        results["mc_batching_speedup"] = results["mc_requests_per_s_batch8"] / results["mc_requests_per_s_batch1"]

        backend = open_backend(str(tmp / "hf"), batch_size=4)
        prompts = [backend.encode(t) for t in ("ROMEO:", "JULIET: O", "First Citizen:", "KING HENRY")]
        timings = {}

        def greedy(rows, n, use_cache):  # the same batched backend call; only the cache differs
            backend.model.generation_config.use_cache = use_cache
            try:
                return [s.tokens for s in backend.generate(rows, SampleParams(n, temperature=0.0, logprobs=False))]
            finally:
                backend.model.generation_config.use_cache = True

        for name, fn in (("kv_cache", lambda p, n: greedy(p, n, True)), ("no_cache", lambda p, n: greedy(p, n, False))):
            fn(prompts, 4)
            start = time.perf_counter()
            out = fn(prompts, 64)
            timings[name] = time.perf_counter() - start
            results[f"generate_tokens_per_s_{name}"] = sum(len(o) for o in out) / timings[name]
        results["generate_cache_speedup"] = timings["no_cache"] / timings["kv_cache"]

    out_dir = ROOT / "benchmarks" / "results"
    atomic_write_text(out_dir / "eval.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out_dir / "eval.md", "\n".join([
        "# Evaluation harness benchmark (tiny VPMoE converted to HF, 1 CPU thread; bpb: best of 2 alternated runs)", "",
        "| measurement | value |", "|---|---:|",
        f"| bpb scoring (tiny-cpu, vocab 8192), {results['bpb_bytes'] // 1000} KB ({results['bpb_tokens']} tokens), per-window sums "
        f"(tokens/s) | {results['bpb_new_tokens_per_s']:.0f} |",
        f"| bpb scoring, per-token results kept, the old path (tokens/s) | {results['bpb_old_tokens_per_s']:.0f} |",
        f"| bpb speed-up | {results['bpb_speedup']:.2f}x |",
        f"| the model's forwards alone, the new path's batches, nothing scored (tokens/s; a ceiling) | "
        f"{results['bpb_forward_tokens_per_s']:.0f} |",
        f"| new path / forwards alone | {results['bpb_new_of_forward_only']:.2f} |",
        f"| per CPU-second (load-independent), new / old / forwards alone (tokens) | "
        f"{results['bpb_new_tokens_per_cpu_s']:.0f} / {results['bpb_old_tokens_per_cpu_s']:.0f} / "
        f"{results['bpb_forward_tokens_per_cpu_s']:.0f} |",
        f"| bpb speed-up per CPU-second; new path / forwards alone | {results['bpb_speedup_cpu']:.2f}x; "
        f"{results['bpb_new_of_forward_only_cpu']:.2f} |",
        f"| bpb peak RSS, new / old (MB, whole process) | {results['bpb_new_peak_rss_mb']:.0f} / "
        f"{results['bpb_old_peak_rss_mb']:.0f} |",
        f"| NLL new vs old, absolute difference (nats, of {results['bpb_new_nll']:.1f}) | "
        f"{results['bpb_nll_abs_diff']:.2e} (bits per byte: {results['bpb_abs_diff']:.1e}) |",
        f"| MC scoring, batch 8 (requests/s) | {results['mc_requests_per_s_batch8']:.1f} |",
        f"| MC scoring, batch 1 (requests/s) | {results['mc_requests_per_s_batch1']:.1f} |",
        f"| batching speed-up | {results['mc_batching_speedup']:.2f}x |",
        f"| greedy generation with sliding KV cache (tokens/s) | {results['generate_tokens_per_s_kv_cache']:.1f} |",
        f"| greedy generation without cache (tokens/s) | {results['generate_tokens_per_s_no_cache']:.1f} |",
        f"| KV cache speed-up (64 new tokens) | {results['generate_cache_speedup']:.2f}x |", ""]))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " ")).parse_args()
    sys.exit(main())
