"""Benchmark: VPMoE's fused ops — Triton kernel (GPU only) vs PyTorch reference vs naive PyTorch.

Each op is timed forward+backward (router: forward + backward of weights and scores) at one
model-like shape, and reported as ms, achieved bandwidth (GB/s, from a minimal bytes-moved
model) and, for the matmul-bound ops, GFLOP/s. On CPU the peers are ``kernels.reference`` and a
naive PyTorch version; the Triton column is filled only when a CUDA device is present (the
Triton interpreter on CPU is a correctness tool, never timed here). A second section measures
the chunked LM-head loss's peak memory against naive logits + ``cross_entropy`` at vocab 201,088,
each run in a fresh process.

Writes benchmarks/results/kernels.json and benchmarks/results/kernels.md.
Run: ``python benchmarks/kernels.py [--threads 1] [--repeats 3] [--skip-memory] [--devices cpu,cuda]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ must not be on the path: its kernels.py / tokenizers.py would shadow the packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from megatron_vpmoe.kernels import reference  # noqa: E402
from megatron_vpmoe.utils.atomic import atomic_file  # noqa: E402

# --- naive PyTorch peers (what one writes without a fused kernel) -------------------------


def naive_rms_norm(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def naive_squared_relu(x):
    return torch.where(x > 0, x * x, torch.zeros_like(x))


def naive_route(logits, bias, topk, groups, group_topk, scaling):
    """Full sorts and a Python loop over groups instead of top-k kernels."""
    scores = torch.sigmoid(logits.float())
    select = scores + bias
    per = select.shape[1] // groups
    group_scores = torch.stack([select[:, g * per:(g + 1) * per].sort(-1, descending=True).values[:, :2].sum(-1)
                                for g in range(groups)], dim=1)
    kept = group_scores.sort(-1, descending=True).indices[:, :group_topk]
    mask = torch.zeros_like(select, dtype=torch.bool)
    for g in range(groups):
        mask[:, g * per:(g + 1) * per] |= (kept == g).any(-1, keepdim=True)
    indices = select.masked_fill(~mask, -math.inf).sort(-1, descending=True).indices[:, :topk]
    weights = scores.gather(1, indices)
    return weights / weights.sum(-1, keepdim=True) * scaling, indices, scores


def naive_dispatch(hidden, indices, weights, num_experts, expert_fn):
    """Per-expert Python loop: boolean mask, gather, compute, weighted index_add."""
    out = torch.zeros_like(hidden)
    for e in range(num_experts):
        token, slot = (indices == e).nonzero(as_tuple=True)
        if token.numel():
            y = expert_fn(hidden[token])
            out = out.index_add(0, token, y * weights[token, slot].unsqueeze(-1).to(y.dtype))
    return out


def naive_attention(q, k, v, sinks, window, scale):
    """PyTorch SDPA with a materialised sliding-window mask; it has no sink term (speed peer only)."""
    rep = q.shape[2] // k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    sq, sk = q.shape[1], k.shape[1]
    qpos = torch.arange(sk - sq, sk, device=q.device).unsqueeze(-1)
    kpos = torch.arange(sk, device=q.device).unsqueeze(0)
    mask = (kpos <= qpos) & (kpos > qpos - window)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).transpose(1, 2)


def naive_linear_cross_entropy(hidden, weight, labels):
    return F.cross_entropy(hidden @ weight.t(), labels, reduction="none", ignore_index=-100)


# --- timing ---------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(fn, inputs, repeats, device):
    """Median seconds of ``fn(*inputs)`` forward plus backward of the sum of its float outputs."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor)
              and x.is_floating_point() else x for x in inputs]

    def step():
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.float().sum() for o in outs if o.is_floating_point() and o.requires_grad)
        loss.backward()

    step()  # warm-up (and Triton compilation on GPU)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def op_cases(device, dtype):
    """(name, {impl: callable}, inputs, bytes moved fwd+bwd, useful FLOPs fwd+bwd) per op.

    ``reference`` calls ``kernels.reference``; on CUDA with Triton, ``triton`` calls
    ``kernels.ops``, which dispatches CUDA tensors to the Triton kernels."""
    from megatron_vpmoe.kernels import ops
    modules = {"reference": reference}
    if device.type == "cuda" and ops.triton_available():
        modules["triton"] = ops
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    def impls(build, naive):
        return {**{name: build(m) for name, m in modules.items()}, "naive": naive}

    es = torch.tensor([], dtype=dtype).element_size()
    cases = []
    tokens, hidden = 4096, 1024
    x, w = rand(tokens, hidden), rand(hidden)
    cases.append(("rms_norm", impls(lambda m: m.rms_norm, naive_rms_norm),
                  [x, w], 5 * tokens * hidden * es, 0))
    ffn = 4096 * 1024
    a = rand(4, ffn // 4)
    cases.append(("squared_relu", impls(lambda m: m.squared_relu, naive_squared_relu),
                  [a], 4 * ffn * es, 0))
    experts, topk, groups, gtopk = 128, 4, 8, 4
    logits = torch.randn(tokens, experts, generator=gen).to(device)
    bias = (torch.randn(experts, generator=gen) * 0.1).to(device)
    cases.append(("route (128 experts, 8 groups)", impls(
        lambda m: lambda l: m.route(l, bias, topk, groups, gtopk, 2.5),
        lambda l: naive_route(l, bias, topk, groups, gtopk, 2.5)),
        [logits], 4 * tokens * experts * 4, 0))
    d_model, n_exp = 512, 32
    h = rand(tokens, d_model)
    idx = torch.stack([torch.randperm(n_exp, generator=gen)[:topk] for _ in range(tokens)]).to(device)
    wts = torch.rand(tokens, topk, generator=gen).to(device)

    def dispatch(m):
        def fn(hid, weights):
            permuted, order, _ = m.permute(hid, idx, n_exp)
            return m.unpermute(permuted * 2.0, order, weights, tokens)
        return fn
    cases.append(("permute+unpermute (32 experts, top-4)", impls(
        dispatch, lambda hid, weights: naive_dispatch(hid, idx, weights, n_exp, lambda y: y * 2.0)),
        [h, wts], 8 * tokens * topk * d_model * es, 0))
    b, s, hq, hkv, d, window = 1, 1024, 8, 2, 64, 128
    q, k, v = rand(b, s, hq, d), rand(b, s, hkv, d), rand(b, s, hkv, d)
    sinks = torch.zeros(hq, device=device)
    visible = sum(min(i + 1, window) for i in range(s))
    cases.append(("attention (S=1024, window 128, sink)", impls(
        lambda m: lambda q_, k_, v_: m.attention(q_, k_, v_, sinks, window, d ** -0.5),
        lambda q_, k_, v_: naive_attention(q_, k_, v_, sinks, window, d ** -0.5)),
        [q, k, v], 4 * b * s * (hq + 2 * hkv) * d * es, 4 * b * hq * visible * d * 3.5))
    n, hid, vocab = 2048, 256, 32768
    hs, wv = rand(n, hid), rand(vocab, hid, scale=0.05)
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    cases.append(("linear_cross_entropy (N=2048, V=32768)", impls(
        lambda m: lambda h_, w_: m.linear_cross_entropy(h_, w_, labels, -100, 1024),
        lambda h_, w_: naive_linear_cross_entropy(h_, w_, labels)),
        [hs, wv], 3 * (n + vocab) * hid * es, 6 * n * vocab * hid))
    return cases


# --- chunked-loss peak memory ---------------------------------------------------------------

PEAK_SCRIPT = r"""
import json, sys, torch, torch.nn.functional as F
from megatron_vpmoe.kernels import reference
mode, n, vocab, hidden, chunk, out = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6]
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
h = torch.randn(n, hidden, generator=gen).requires_grad_()
w = (torch.randn(vocab, hidden, generator=gen) * 0.05).requires_grad_()
labels = torch.randint(0, vocab, (n,), generator=gen)
labels[::7] = -100

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
base = status("VmRSS:")
if mode == "naive":
    loss = F.cross_entropy(h @ w.t(), labels, reduction="none", ignore_index=-100)
else:
    loss = reference.linear_cross_entropy(h, w, labels, -100, chunk)
loss.sum().backward()
peak = status("VmHWM:") - base
if out != "-":
    torch.save({"loss": loss.detach(), "gh": h.grad, "gw": w.grad}, out)
print(json.dumps({"peak_bytes": peak}))
"""


def measure_loss_peak(mode: str, n: int, vocab: int, hidden: int, chunk: int, out_path="-") -> int:
    """Peak RSS (bytes) above the pre-loss baseline of one fwd+bwd of the LM-head loss, in a
    fresh process (Linux). ``mode`` is ``naive`` (logits + ``cross_entropy``) or ``chunked``
    (``kernels.reference.linear_cross_entropy``); with ``out_path`` the loss and gradients are saved.

    glibc's malloc is told to mmap every block of 64 KiB or more (for both variants alike), so
    freed tensors leave the process at once and the peak is the live tensor memory, not heap
    fragmentation from its adaptive mmap threshold."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, mode, str(n), str(vocab), str(hidden),
                           str(chunk), str(out_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory run {mode} n={n} V={vocab} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def available_memory() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def memory_section(vocab=201088, hidden=64, chunk=1024):
    rows = []
    for n in (1024, 2048, 8192):
        row = {"tokens": n, "vocab": vocab, "hidden": hidden, "chunk": chunk}
        t0 = time.perf_counter()
        row["chunked_peak_bytes"] = measure_loss_peak("chunked", n, vocab, hidden, chunk)
        row["chunked_s"] = round(time.perf_counter() - t0, 1)
        naive_need = 4 * n * vocab * 4 + (2 << 30)
        if available_memory() > naive_need:
            t0 = time.perf_counter()
            row["naive_peak_bytes"] = measure_loss_peak("naive", n, vocab, hidden, chunk)
            row["naive_s"] = round(time.perf_counter() - t0, 1)
        else:
            row["naive_peak_bytes"] = None
            row["naive_skipped"] = (f"needs ~{naive_need / 2**30:.0f} GiB, "
                                    f"{available_memory() / 2**30:.1f} GiB available")
        rows.append(row)
    measured = [r for r in rows if r["naive_peak_bytes"]]
    if len(measured) >= 2:  # naive peak is linear in tokens: fit it through the measured points
        (n0, p0), (n1, p1) = [(r["tokens"], r["naive_peak_bytes"]) for r in measured[-2:]]
        slope = (p1 - p0) / (n1 - n0)
        for r in rows:
            if r["naive_peak_bytes"] is None:
                r["naive_peak_bytes_extrapolated"] = int(p1 + slope * (r["tokens"] - n1))
    return rows


# --- report ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--devices", default="cpu,cuda",
                    help="devices to time, comma-separated (cuda is skipped where there is none)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of devices not timed in this run from the existing <out>/kernels.json "
                         "(a GPU run adds its section beside the CPU one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {"host": platform.processor() or platform.machine(), "threads": args.threads,
               "torch": torch.__version__, "devices": {}}
    if torch.cuda.is_available():
        import triton
        results["gpu_name"] = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    previous = Path(args.out) / "kernels.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        results["devices"] = dict(old.get("devices", {}))
        for key in ("loss_peak_memory", "gpu_name", "gpu"):
            if key in old:
                results.setdefault(key, old[key])
    wanted = args.devices.split(",")
    devices = [torch.device(d) for d in wanted if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    for device in devices:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        cases = op_cases(device, dtype)
        rows = []
        for name, impls, inputs, nbytes, flops in cases:
            row = {"op": name, "dtype": str(dtype).replace("torch.", "")}
            for impl, fn in impls.items():
                sec = time_fwd_bwd(fn, inputs, args.repeats, device)
                row[impl] = {"ms": round(sec * 1e3, 3), "GB/s": round(nbytes / sec / 1e9, 2),
                             "GFLOP/s": round(flops / sec / 1e9, 1) if flops else None}
                print(f"[{device.type}] {name:32s} {impl:9s} {sec * 1e3:9.2f} ms", flush=True)
            rows.append(row)
        results["devices"][device.type] = rows
    if "cuda" in results["devices"]:
        results.pop("gpu", None)
    else:
        results["gpu"] = "no CUDA device on this host: Triton kernel timings pending a GPU run"
    if not args.skip_memory:
        results["loss_peak_memory"] = memory_section()
    out = Path(args.out)
    with atomic_file(out / "kernels.json") as f:
        json.dump(results, f, indent=2)
    with atomic_file(out / "kernels.md") as f:
        f.write(render_markdown(results))
    print(render_markdown(results))


def render_markdown(results) -> str:
    lines = [f"# kernels benchmark ({results['host']}, {results['threads']} thread(s), torch {results['torch']})",
             "", "Forward + backward per op; median of the timed repeats. GB/s from a minimal "
             "bytes-moved model, GFLOP/s from useful FLOPs (matmul-bound ops)."]
    for device, rows in results["devices"].items():
        impls = [k for k in ("triton", "reference", "naive") if any(k in r for r in rows)]
        triton = "triton" in impls
        lines += ["", f"## {device}" + (f" ({results['gpu_name']})" if device == "cuda" and "gpu_name" in results else ""),
                  "", "| op | dtype | " + " | ".join(f"{i} ms (GB/s, GFLOP/s)" for i in impls)
                  + (" | triton speed-up over reference" if triton else "")
                  + " | reference speed-up over naive |", "|---|---|" + "---|" * (len(impls) + 1 + triton)]
        for r in rows:
            cells = []
            for i in impls:
                m = r.get(i)
                cells.append("-" if m is None else f"{m['ms']} ({m['GB/s']}"
                             + (f", {m['GFLOP/s']}" if m['GFLOP/s'] else "") + ")")
            ratio = r["naive"]["ms"] / r["reference"]["ms"]
            speedup = f" | {r['reference']['ms'] / r['triton']['ms']:.2f}x" if triton and r.get("triton") else (" | -" if triton else "")
            lines.append(f"| {r['op']} | {r['dtype']} | " + " | ".join(cells) + speedup + f" | {ratio:.2f}x |")
    if "gpu" in results:
        lines += ["", f"GPU: {results['gpu']}. The Triton kernels were verified on CPU with the "
                  "Triton interpreter, which is not a performance number."]
    else:
        lines += ["", "The cuda section is a GPU run (`benchmarks/device_check.sh`, one run, bf16); the cpu "
                  "section's peers run in fp32 on this project's 2-core machines."]
    if "loss_peak_memory" in results:
        lines += ["", "## LM-head loss peak memory (fwd+bwd, vocab 201,088, hidden 64, fresh process each)",
                  "", "| tokens | chunked (chunk 1024) | naive logits + cross_entropy | naive / chunked |",
                  "|---|---|---|---|"]
        for r in results["loss_peak_memory"]:
            c = r["chunked_peak_bytes"] / 2**20
            if r["naive_peak_bytes"]:
                nv, note = r["naive_peak_bytes"] / 2**20, ""
            else:
                nv = r.get("naive_peak_bytes_extrapolated", 0) / 2**20
                note = f" (extrapolated; not run: {r['naive_skipped']})"
            lines.append(f"| {r['tokens']} | {c:.0f} MiB | {nv:.0f} MiB{note} | {nv / c:.1f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
