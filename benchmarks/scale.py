"""Scale on CPU processes: per-rank memory of the sharded engine, measured, against the single process.

Sections (each in fresh processes, so every peak is its own):

* ``memory``: ``examples/configs/medium-cpu.yaml`` (277M params) trained 2 steps with a checkpoint
  save, once in one process and once as 8 gloo ranks (EP=4 x PP=2, ``vpmoe launch local``),
  with ``log.memory_report`` on: each rank's measured peak RSS over the whole run, the RSS growth
  while building its model against its shard's parameter bytes, and the rise during a checkpoint
  save against its shard's state (parameters + optimizer state).
* ``pipeline``: PP=2 over 2 ranks (torchrun) on the medium config, saved-activation peak per stage
  at 2 and 8 micro-batches under 1F1B, and under GPipe as the peer.
* ``recompute``: one process, one micro-batch of the medium config under ``train.recompute``
  none / selective / full: saved-activation peak, the step's RSS rise, time, loss and gradients.
* ``overlap``: DP=2 step time of the tiny and medium configs with the bucketed reduction launched
  during backward vs one reduction after it (alternating, best step).
* ``sequence``: TP=2 over 2 ranks on the medium config with and without ``parallel.sequence_parallel``:
  bytes the residual-stream norms save for backward (the norm/residual regions SP splits), the
  whole forward's saved bytes, loss and step time.
* ``zero2``: DP=2 (2 gloo ranks) on the tiny and medium configs, one fresh pair of processes per
  mode: plain data parallel (bucketed all-reduce, whole AdamW state) and ZeRO-2
  (``parallel.distributed_optimizer``: buckets reduce-scattered, state split, updated rows
  all-gathered, whole TP/EP shards broadcast by their owner). Per rank and step: bytes handed
  to each collective, counted by a wrapper around ``torch.distributed``'s calls, and the bytes a
  ring algorithm sends for them; optimizer-state and gradient tensor bytes held (at the optimizer
  step and at the peak, during backward); the step's peak RSS; step time.
* ``shard``: ``vpmoe-6b.yaml`` (EP=8 x PP=4 of 32 ranks) under a fake process group: one process
  builds rank 0's shard and the last stage's (rank 31), parameter count against
  ``parallel/layout.py``'s arithmetic. ``--shard-6b --rank R`` runs one rank and ends with
  ``shard-6b rank R: params P, peak_rss_mb M, build_s S``.

Writes benchmarks/results/scale.json and scale.md. Run: ``python benchmarks/scale.py``
(``--only memory pipeline recompute shard overlap sequence zero2``). Takes about 15-25 minutes on 2 cores.
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
MEDIUM = ROOT / "examples" / "configs" / "medium-cpu.yaml"
SIXB = ROOT / "examples" / "configs" / "vpmoe-6b.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(map(str, cmd))}\n{out.stderr[-3000:]}")
    return out


def _two_ranks(kind: str, *args) -> None:
    """Run this script's ``--_child kind args...`` as 2 gloo ranks under torchrun."""
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
          "--rdzv-endpoint", "127.0.0.1:0", str(Path(__file__)), "--_child", kind, *map(str, args)])


def _memory_records(run_dir: Path) -> list:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "memory").glob("rank_*.json"))]


# -- memory: one process vs EP=4 x PP=2 ------------------------------------------------------------
def bench_memory(tmp: Path) -> dict:
    common = ["--set", "train.steps=2", "--set", "checkpoint.interval=1", "--set", "log.memory_report=true"]
    single_dir, multi_dir = tmp / "single", tmp / "ep4pp2"
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "megatron_vpmoe.cli", "train", "--config", str(MEDIUM), "--quiet",
          "--set", f"run.dir={single_dir}", *common])
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "megatron_vpmoe.cli", "launch", "local", "--nproc", "8", "--config", str(MEDIUM),
          "--set", f"run.dir={multi_dir}", "--set", "parallel.expert=4", "--set", "parallel.pipeline=2", *common])
    multi_s = time.perf_counter() - t0
    idle = _run([sys.executable, "-c", "import megatron_vpmoe.training.trainer, megatron.core.parallel_state;"
                 "from megatron_vpmoe.utils.memory import rss_bytes; print(rss_bytes() / 2**20)"])
    single = _memory_records(single_dir)[0]
    ranks = []
    for r in _memory_records(multi_dir):
        shard, phases = r["shard"], r["phases"]
        state = shard["params_mb"] + shard["optimizer_state_mb"]
        ranks.append({
            "rank": r["rank"], "peak_mb": r["process_peak_mb"], "params": shard["params"],
            "params_mb": shard["params_mb"], "state_mb": state,
            "construction_rise_mb": phases["construction"]["rise_mb"],
            "construction_over_params": phases["construction"]["rise_mb"] / shard["params_mb"],
            "save_rise_mb": phases["checkpoint_save"]["rise_mb"],
            "save_over_state": phases["checkpoint_save"]["rise_mb"] / state,
        })
    worst = max(ranks, key=lambda r: r["peak_mb"])
    return {
        "config": str(MEDIUM.relative_to(ROOT)), "params": single["shard"]["params"],
        "idle_process_mb": float(idle.stdout.strip()),
        "single_peak_mb": single["process_peak_mb"], "single_phases": single["phases"], "single_s": single_s,
        "ranks": ranks, "max_rank_peak_mb": worst["peak_mb"], "argmax_rank": worst["rank"],
        "max_over_single": worst["peak_mb"] / single["process_peak_mb"],
        "max_construction_over_params": max(r["construction_over_params"] for r in ranks),
        "max_save_over_state": max(r["save_over_state"] for r in ranks), "multi_s": multi_s,
    }


# -- pipeline: activations in flight under 1F1B vs GPipe -----------------------------------------
def _pipeline_child(out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.pipelining as pipelining

    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    from megatron_vpmoe.utils.memory import SavedActivationMeter, peak_rss_bytes, reset_peak_rss, rss_bytes

    dist.init_process_group("gloo")

    def _mean_loss(per_token, mb):  # the engine takes the objective from its caller
        return per_token.mean(), per_token.detach().sum().double().view(1)

    cfg = load_config(MEDIUM, ["parallel.pipeline=2"])
    ctx = init_parallel(cfg.parallel)
    seq = cfg.data.seq_length
    result = {}
    for schedule in ("1f1b", "gpipe"):
        if schedule == "gpipe":
            pipelining.Schedule1F1B = pipelining.ScheduleGPipe
        pm = build_parallel_model(cfg.model, ctx, seed=1)
        for n_micro in (2, 8):
            g = torch.Generator().manual_seed(n_micro)
            mbs = [{"input_ids": torch.randint(0, cfg.model.vocab_size, (1, seq), generator=g),
                    "labels": torch.randint(0, cfg.model.vocab_size, (1, seq), generator=g)}
                   for _ in range(n_micro)]
            before = rss_bytes()
            reset_peak_rss()
            t0 = time.perf_counter()
            with SavedActivationMeter(exclude=pm.parameters()) as meter:
                pm.forward_backward(mbs, _mean_loss)
            result[f"{schedule}_{n_micro}"] = {"activation_peak_mb": meter.peak / 2**20,
                                               "rss_rise_mb": (peak_rss_bytes() - before) / 2**20,
                                               "step_s": time.perf_counter() - t0}
            for p in pm.parameters():
                p.grad = None
        del pm
    Path(out_dir, f"rank_{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def bench_pipeline(tmp: Path) -> dict:
    out = tmp / "pipeline"
    out.mkdir()
    _two_ranks("pipeline", out)
    stages = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(2)]
    return {"stages": stages,
            "ratio_8_over_2_1f1b": [s["1f1b_8"]["activation_peak_mb"] / s["1f1b_2"]["activation_peak_mb"] for s in stages],
            "ratio_8_over_2_gpipe": [s["gpipe_8"]["activation_peak_mb"] / s["gpipe_2"]["activation_peak_mb"] for s in stages]}


# -- data-parallel gradient reduction: overlapped buckets vs one reduction after backward ------------
TINY = ROOT / "examples" / "configs" / "tiny-cpu.yaml"


def _overlap_child(out_dir: str, config: str, steps: str) -> None:
    import torch
    import torch.distributed as dist

    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")

    def mean_loss(per_token, mb):
        return per_token.mean(), per_token.detach().sum().double().view(1)

    cfg = load_config(config, [])
    seq, mb = cfg.data.seq_length, cfg.train.micro_batch_size
    models = {}
    for overlap in (True, False):
        ctx = init_parallel(type(cfg.parallel)(overlap_grad_reduce=overlap))
        models[overlap] = build_parallel_model(cfg.model, ctx, seed=1)
    g = torch.Generator().manual_seed(dist.get_rank())
    batch = [{"input_ids": torch.randint(0, cfg.model.vocab_size, (mb, seq), generator=g),
              "labels": torch.randint(0, cfg.model.vocab_size, (mb, seq), generator=g)} for _ in range(2)]
    times = {True: [], False: []}
    for step in range(int(steps) + 1):  # alternate, first round is warm-up
        for overlap in (True, False):
            pm = models[overlap]
            dist.barrier()
            t0 = time.perf_counter()
            pm.forward_backward(batch, mean_loss)
            elapsed = time.perf_counter() - t0
            if step:
                times[overlap].append(elapsed)
            for p in pm.parameters():
                p.grad = None
    Path(out_dir, f"rank_{dist.get_rank()}.json").write_text(json.dumps(
        {"overlapped_s": min(times[True]), "after_backward_s": min(times[False]),
         "grad_mb": sum(p.numel() for p in models[True].parameters()) * 4 / 2**20}))
    dist.destroy_process_group()


def bench_overlap(tmp: Path) -> dict:
    out = {}
    for name, config, steps in (("tiny", TINY, 5), ("medium", MEDIUM, 2)):
        d = tmp / f"overlap_{name}"
        d.mkdir()
        _two_ranks("overlap", d, config, steps)
        r = json.loads((d / "rank_0.json").read_text())
        r["overlapped_over_after"] = r["overlapped_s"] / r["after_backward_s"]
        out[name] = r
    return out


# -- ZeRO-2: reduce-scatter + all-gather vs all-reduce, and what a rank holds -----------------------
ZERO_MODES = ("allreduce", "zero2", "allreduce-1mb", "zero2-1mb")  # -1mb: one micro-batch, no accumulation
_COLLECTIVES = {  # name -> (kind, the argument whose bytes it moves, ring bytes sent per rank / payload)
    "all_reduce": ("all_reduce", 0, lambda n: 2 * (n - 1) / n),
    "reduce_scatter_single": ("reduce_scatter", 1, lambda n: (n - 1) / n),
    "reduce_scatter_tensor": ("reduce_scatter", 1, lambda n: (n - 1) / n),
    "all_gather_single": ("all_gather", 0, lambda n: (n - 1) / n),
    "all_gather_into_tensor": ("all_gather", 0, lambda n: (n - 1) / n),
    "broadcast": ("broadcast", 0, lambda n: (n - 1) / n),  # averaged over the group's ranks
}


def _count_collectives(counts: dict) -> None:
    """Wrap torch.distributed's collectives so each call adds its payload bytes (and the bytes a
    ring algorithm sends from this rank) to ``counts[kind]`` while ``counts["on"]``."""
    import torch.distributed as dist

    for name, (kind, arg, ring) in _COLLECTIVES.items():
        original = getattr(dist, name)

        def wrapped(*args, _original=original, _kind=kind, _arg=arg, _ring=ring, **kwargs):
            if counts["on"]:
                tensor = args[_arg]
                group = kwargs.get("group")
                n = dist.get_world_size(group)
                payload = tensor.numel() * tensor.element_size()
                entry = counts.setdefault(_kind, {"calls": 0, "payload_bytes": 0, "ring_sent_bytes": 0.0})
                entry["calls"] += 1
                entry["payload_bytes"] += payload
                entry["ring_sent_bytes"] += payload * _ring(n)
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)


def _zero2_child(out_dir: str, config: str, mode: str, steps: str) -> None:
    import torch
    import torch.distributed as dist

    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    from megatron_vpmoe.parallel.zero import DistributedOptimizer
    from megatron_vpmoe.training.optimizer import build_optimizer, clip_gradients
    from megatron_vpmoe.utils.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    counts = {"on": False}
    _count_collectives(counts)

    def mean_loss(per_token, mb):
        return per_token.mean(), per_token.detach().sum().double().view(1)

    cfg = load_config(config, [])
    ctx = init_parallel(cfg.parallel)
    pm = build_parallel_model(cfg.model, ctx, seed=1)
    opt = build_optimizer(pm.module, cfg.train.optimizer)
    zero = mode.startswith("zero2")
    if zero:
        opt = DistributedOptimizer(opt, pm)
    seq, mb = cfg.data.seq_length, cfg.train.micro_batch_size
    g = torch.Generator().manual_seed(dist.get_rank())
    batch = [{"input_ids": torch.randint(0, cfg.model.vocab_size, (mb, seq), generator=g),
              "labels": torch.randint(0, cfg.model.vocab_size, (mb, seq), generator=g)}
             for _ in range(1 if mode.endswith("-1mb") else 2)]
    held = {}

    def gradient_bytes() -> int:
        """Bytes of gradient storage alive now: bucket buffers (full, and ZeRO-2's received
        segments) and gradients outside the buckets."""
        sync = pm.gradients.sync
        total = 0
        if sync:
            for b in sync.buckets:
                total += 0 if b.buffer is None else b.buffer.numel() * b.buffer.element_size()
                received = getattr(b, "received", None)
                total += 0 if received is None else received.numel() * received.element_size()
        in_sync = {id(p) for p in sync.params} if sync else set()
        return total + sum(p.grad.numel() * p.grad.element_size() for p in pm.module.parameters()
                           if p.grad is not None and id(p) not in in_sync)

    def step(measure: bool) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        counts["on"] = measure
        pm.forward_backward(batch, mean_loss)
        clip_gradients(pm.grad_tensors(), cfg.train.optimizer.clip_grad, total_norm=pm.grad_norm())
        held["at_step"] = gradient_bytes()
        opt.step()
        opt.zero_grad(set_to_none=True)  # ZeRO-2: the next step's layers wait for their all-gathers
        counts["on"] = False
        return time.perf_counter() - t0

    step(False)  # warm-up: AdamW state and bucket buffers are created
    from megatron_vpmoe.parallel import grad_sync

    def measured(method):  # the gradients' peak: whenever a bucket buffer is allocated
        def run(bucket, *args):
            out = method(bucket, *args)
            held["backward"] = max(held.get("backward", 0), gradient_bytes())
            return out
        return run

    grad_sync._Bucket.ensure_buffer = measured(grad_sync._Bucket.ensure_buffer)
    held["backward"] = gradient_bytes()
    base = rss_bytes()
    reset_peak_rss()
    times = [step(True) for _ in range(int(steps))]
    if zero:
        opt.wait_for_parameters()
    inner = getattr(opt, "optimizer", opt)
    state = sum(t.numel() * t.element_size() for s in inner.state.values() for key, t in s.items()
                if isinstance(t, torch.Tensor) and key != "step")
    params = sum(p.numel() * p.element_size() for p in pm.module.parameters())
    sync = pm.gradients.sync
    n = int(steps)
    Path(out_dir, f"{mode}_rank_{dist.get_rank()}.json").write_text(json.dumps({
        "params_bytes": params, "optimizer_state_bytes": state,
        "grad_bytes_at_step": held["at_step"], "grad_bytes_peak": held["backward"],
        "padding_bytes": sum(b.padding * b.dtype.itemsize for b in sync.buckets) if sync else 0,
        "buckets": len(sync.buckets) if sync else 0,
        "step_peak_rss_mb": peak_rss_bytes() / 2**20, "step_rss_rise_mb": (peak_rss_bytes() - base) / 2**20,
        "step_s": min(times),
        "per_step": {kind: {k: v / n for k, v in c.items()} for kind, c in counts.items() if kind != "on"}}))
    dist.destroy_process_group()


def bench_zero2(tmp: Path, configs=None) -> dict:
    out = {}
    for name, config, steps in configs or (("tiny", TINY, 3), ("medium", MEDIUM, 2)):
        d = tmp / f"zero2_{name}"
        d.mkdir()
        for mode in ZERO_MODES:  # fresh processes per mode: each peak is its own
            _two_ranks("zero2", d, config, mode, steps)
        ranks = {mode: [json.loads((d / f"{mode}_rank_{r}.json").read_text()) for r in range(2)] for mode in ZERO_MODES}
        res = {"params": ranks["allreduce"][0]["params_bytes"] // 4, "modes": {}}
        for mode, rs in ranks.items():
            per_kind = {}
            for kind in {k for r in rs for k in r["per_step"]}:
                per_kind[kind] = {key: max(r["per_step"].get(kind, {}).get(key, 0) for r in rs)
                                  for key in ("calls", "payload_bytes", "ring_sent_bytes")}
            res["modes"][mode] = {
                "ranks": rs, "per_kind": per_kind,
                "ring_sent_mb": max(sum(c["ring_sent_bytes"] for c in r["per_step"].values()) for r in rs) / 2**20,
                "payload_mb": max(sum(c["payload_bytes"] for c in r["per_step"].values()) for r in rs) / 2**20,
                "optimizer_state_mb": max(r["optimizer_state_bytes"] for r in rs) / 2**20,
                "grad_at_step_mb": max(r["grad_bytes_at_step"] for r in rs) / 2**20,
                "grad_peak_mb": max(r["grad_bytes_peak"] for r in rs) / 2**20,
                "step_peak_rss_mb": max(r["step_peak_rss_mb"] for r in rs),
                "step_s": max(r["step_s"] for r in rs)}
        for mode in ZERO_MODES:
            plain = res["modes"]["allreduce-1mb" if mode.endswith("-1mb") else "allreduce"]
            m = res["modes"][mode]
            m["over_allreduce"] = {key: m[key] / plain[key] if plain[key] else None for key in (
                "ring_sent_mb", "payload_mb", "optimizer_state_mb", "grad_at_step_mb", "grad_peak_mb",
                "step_peak_rss_mb", "step_s")}
        out[name] = res
    return out


# -- sequence parallelism: TP=2 with and without it ------------------------------------------------
def _sequence_child(out_dir: str, config: str) -> None:
    import torch
    import torch.distributed as dist

    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    from megatron_vpmoe.utils.memory import SavedActivationMeter

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = load_config(config, [])
    seq, mb = cfg.data.seq_length, cfg.train.micro_batch_size
    g = torch.Generator().manual_seed(0)  # the same batch on both TP ranks
    ids = torch.randint(0, cfg.model.vocab_size, (mb, seq), generator=g)
    labels = torch.randint(0, cfg.model.vocab_size, (mb, seq), generator=g)
    out = {}
    for sp in (False, True):
        ctx = init_parallel(type(cfg.parallel)(tensor=2, sequence_parallel=sp))
        pm = build_parallel_model(cfg.model, ctx, seed=1)
        model = pm.module
        # the norm regions: what the residual-stream norms save for backward (the residual adds
        # and p=0 dropout save nothing), metered only while those modules run
        norms = SavedActivationMeter(exclude=model.parameters())
        def enter(*_):
            norms.__enter__()  # a pre-hook's return value would replace the input: return None

        def leave(*_):
            norms.__exit__(None, None, None)

        hooks = []
        for name, module in model.named_modules():
            if name.endswith("layernorm"):
                hooks.append(module.register_forward_pre_hook(enter))
                hooks.append(module.register_forward_hook(leave))
        t0 = time.perf_counter()
        loss = model(ids, labels=labels).mean()
        norm_peak = norms.peak
        loss.backward()
        step_s = time.perf_counter() - t0
        for h in hooks:
            h.remove()
        for p in model.parameters():
            p.grad = None
        with SavedActivationMeter(exclude=model.parameters()) as whole:
            loss2 = model(ids, labels=labels).mean()
        loss2.backward()
        for _ in range(2):  # the best of three steps (the first one above included)
            for p in model.parameters():
                p.grad = None
            dist.barrier()
            t0 = time.perf_counter()
            model(ids, labels=labels).mean().backward()
            step_s = min(step_s, time.perf_counter() - t0)
        out["sp" if sp else "tp"] = {"norm_region_mb": norm_peak / 2**20, "whole_forward_mb": whole.peak / 2**20,
                                     "loss": float(loss.detach()), "step_s": step_s}
        del pm, model
    Path(out_dir, f"rank_{dist.get_rank()}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def bench_sequence(tmp: Path) -> dict:
    d = tmp / "sequence"
    d.mkdir()
    _two_ranks("sequence", d, MEDIUM)
    r = json.loads((d / "rank_0.json").read_text())
    r["norm_region_sp_over_tp"] = r["sp"]["norm_region_mb"] / r["tp"]["norm_region_mb"]
    r["whole_forward_sp_over_tp"] = r["sp"]["whole_forward_mb"] / r["tp"]["whole_forward_mb"]
    r["loss_rel_diff"] = abs(r["sp"]["loss"] - r["tp"]["loss"]) / abs(r["tp"]["loss"])
    return r


# -- recompute -------------------------------------------------------------------------------------
def _recompute_child(mode: str, out_file: str) -> None:
    import torch

    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.utils.memory import SavedActivationMeter, peak_rss_bytes, reset_peak_rss, rss_bytes

    torch.set_num_threads(1)
    cfg = load_config(MEDIUM, [])
    torch.manual_seed(1)
    model = VpmoeModel(cfg.model)
    model.set_recompute(mode)
    g = torch.Generator().manual_seed(0)
    seq = cfg.data.seq_length
    ids = torch.randint(0, cfg.model.vocab_size, (2, seq), generator=g)
    labels = torch.randint(0, cfg.model.vocab_size, (2, seq), generator=g)
    before = rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    with SavedActivationMeter(exclude=model.parameters()) as meter:
        loss = model(ids, labels=labels).mean()
    loss.backward()
    elapsed = time.perf_counter() - t0
    grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))
    Path(out_file).write_text(json.dumps({
        "activation_peak_mb": meter.peak / 2**20, "rss_rise_mb": (peak_rss_bytes() - before) / 2**20,
        "step_s": elapsed, "loss": float(loss.detach()), "grad_norm": grad_norm}))


def bench_recompute(tmp: Path) -> dict:
    out = {}
    for mode in ("none", "selective", "full"):
        path = tmp / f"recompute_{mode}.json"
        _run([sys.executable, str(Path(__file__)), "--_child", "recompute", mode, str(path)])
        out[mode] = json.loads(path.read_text())
    base = out["none"]
    for mode, r in out.items():
        r["activation_over_none"] = r["activation_peak_mb"] / base["activation_peak_mb"]
        r["loss_rel_diff"] = abs(r["loss"] - base["loss"]) / abs(base["loss"])
        r["grad_norm_rel_diff"] = abs(r["grad_norm"] - base["grad_norm"]) / base["grad_norm"]
        r["time_over_none"] = r["step_s"] / base["step_s"]
    return out


# -- the 6B shard under a fake process group --------------------------------------------------------
def shard_6b(rank: int) -> dict:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.model.params import count_parameters
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    from megatron_vpmoe.parallel.layout import shard_parameter_count
    from megatron_vpmoe.utils.memory import peak_rss_bytes, rss_bytes

    cfg = load_config(SIXB, [])
    world = 32  # the design's 4 nodes x 8 GPUs
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    ctx = init_parallel(cfg.parallel)
    before = rss_bytes()
    t0 = time.perf_counter()
    pm = build_parallel_model(cfg.model, ctx, seed=cfg.run.seed)
    build_s = time.perf_counter() - t0
    params = sum(t.numel() for t in pm.parameters())
    expected = shard_parameter_count(cfg.model, tp=ctx.tp, ep=ctx.ep, pp=ctx.pp, vpp=ctx.vpp, pp_rank=ctx.pp_rank)
    result = {"rank": rank, "world_size": world, "pp_rank": ctx.pp_rank, "ep_rank": ctx.ep_rank,
              "dp": ctx.dp, "params": params, "expected_params": expected,
              "total_params": count_parameters(cfg.model).total,
              "params_mb": params * 4 / 2**20, "rss_before_mb": before / 2**20,
              "peak_rss_mb": peak_rss_bytes() / 2**20, "build_s": build_s}
    dist.destroy_process_group()
    return result


def bench_shards() -> dict:
    out = {}
    for rank in (0, 31):
        run = _run([sys.executable, str(Path(__file__)), "--shard-6b", "--rank", str(rank), "--json"])
        out[rank] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


# -- report ----------------------------------------------------------------------------------------
def _table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _markdown(res: dict) -> str:
    lines = ["# Scale on CPU processes (benchmarks/scale.py)", "",
             f"Host: {platform.machine()}, {os.cpu_count()} cores; gloo; fp32; peaks are the kernel's "
             "own peak-RSS mark per phase (`/proc/self/status` VmHWM, reset between phases).", ""]
    m = res.get("memory")
    if m:
        lines += [f"## Per-rank memory: {m['config']} ({m['params'] / 1e6:.0f}M params), 2 steps + a checkpoint save", "",
                  f"- one process: peak **{m['single_peak_mb']:.0f} MB** "
                  f"(construction {m['single_phases']['construction']['peak_mb']:.0f}, "
                  f"step {m['single_phases']['step']['peak_mb']:.0f}, save {m['single_phases']['checkpoint_save']['peak_mb']:.0f})",
                  f"- 8 ranks EP=4 x PP=2: largest rank peak **{m['max_rank_peak_mb']:.0f} MB** (rank {m['argmax_rank']}) = "
                  f"**{m['max_over_single']:.3f} x** the single process (target <= 0.30)",
                  f"- an idle process (python + torch + megatron-core imported): {m['idle_process_mb']:.0f} MB of every rank's peak", ""]
        lines += _table(["rank", "shard params", "params MB", "peak MB", "construction rise MB", "/ params",
                         "save rise MB", "/ (params + optimizer)"], [
            [r["rank"], f"{r['params'] / 1e6:.1f}M", f"{r['params_mb']:.0f}", f"{r['peak_mb']:.0f}",
             f"{r['construction_rise_mb']:.0f}", f"{r['construction_over_params']:.2f}",
             f"{r['save_rise_mb']:.0f}", f"{r['save_over_state']:.2f}"] for r in m["ranks"]])
        lines += ["", f"Worst construction rise / shard params: **{m['max_construction_over_params']:.2f}** (target <= 1.3); "
                  f"worst save rise / shard state: **{m['max_save_over_state']:.2f}** (target <= 1.3).", ""]
    p = res.get("pipeline")
    if p:
        lines += ["## Pipeline: saved activations per stage, PP=2, medium config, micro-batch 1 x 128", ""]
        lines += _table(["stage", "1F1B 2 mb MB", "1F1B 8 mb MB", "8/2", "GPipe 2 mb MB", "GPipe 8 mb MB", "8/2"], [
            [i, f"{st['1f1b_2']['activation_peak_mb']:.1f}", f"{st['1f1b_8']['activation_peak_mb']:.1f}",
             f"{p['ratio_8_over_2_1f1b'][i]:.2f}", f"{st['gpipe_2']['activation_peak_mb']:.1f}",
             f"{st['gpipe_8']['activation_peak_mb']:.1f}", f"{p['ratio_8_over_2_gpipe'][i]:.2f}"]
            for i, st in enumerate(p["stages"])])
        lines += ["", "Target: 1F1B 8/2 <= 1.25.", ""]
    r = res.get("recompute")
    if r:
        lines += ["## Activation recompute: medium config, one process, micro-batch 2 x 128", ""]
        lines += _table(["mode", "saved activations MB", "/ none", "step RSS rise MB", "step s", "/ none",
                         "loss rel. diff", "grad-norm rel. diff"], [
            [mode, f"{x['activation_peak_mb']:.0f}", f"{x['activation_over_none']:.2f}", f"{x['rss_rise_mb']:.0f}",
             f"{x['step_s']:.1f}", f"{x['time_over_none']:.2f}", f"{x['loss_rel_diff']:.1e}",
             f"{x['grad_norm_rel_diff']:.1e}"] for mode, x in r.items()])
        lines += ["", "Target: full <= 0.5 x none at the same loss (1e-6); selective in between.", ""]
    o = res.get("overlap")
    if o:
        lines += ["## Data-parallel gradient reduction, DP=2 (2 gloo ranks, 2 micro-batches, best step)", ""]
        lines += _table(["config", "gradients MB", "overlapped buckets s", "one reduction after backward s", "ratio"], [
            [name, f"{x['grad_mb']:.0f}", f"{x['overlapped_s']:.3f}", f"{x['after_backward_s']:.3f}",
             f"{x['overlapped_over_after']:.3f}"] for name, x in o.items()])
        lines += [""]
    q = res.get("sequence")
    if q:
        lines += ["## Sequence parallelism: TP=2 (2 gloo ranks), medium config, one micro-batch, per rank", ""]
        lines += _table(["layout", "norm regions: saved MB", "whole forward: saved MB", "loss", "fwd+bwd s (best of 3)"], [
            [name, f"{q[key]['norm_region_mb']:.2f}", f"{q[key]['whole_forward_mb']:.1f}", f"{q[key]['loss']:.6f}",
             f"{q[key]['step_s']:.2f}"] for key, name in (("tp", "TP=2"), ("sp", "TP=2 + sequence parallel"))])
        lines += ["", f"Norm/residual regions with SP / without: **{q['norm_region_sp_over_tp']:.3f}** (target 0.5); "
                  f"whole forward: {q['whole_forward_sp_over_tp']:.3f}; loss rel. diff {q['loss_rel_diff']:.1e}.", ""]
    z = res.get("zero2")
    if z:
        lines += ["## ZeRO-2: gradients reduce-scattered, DP=2 (2 gloo ranks), per rank and step", "",
                  "Modes: 2 micro-batches (gradients accumulated; ZeRO-2 keeps the bucket buffers and "
                  "reduce-scatters in place) and `-1mb`: one micro-batch (ZeRO-2 frees each full buffer once "
                  "its reduce-scatter is done, at most 2 in flight); ratios against plain DP with as many.", "",
                  "Bytes: handed to collectives (payload) and what a ring algorithm sends from a rank for them "
                  "(all-reduce 2(n-1)/n, reduce-scatter and all-gather (n-1)/n of the payload; broadcast (n-1)/n, "
                  "averaged over the group), counted by a wrapper around `torch.distributed`'s calls during "
                  "the step (forward, backward, norm, optimizer step, the parameter all-gather launched by it; "
                  "the next step's layers wait for it). Memory: tensor bytes held by the larger rank (gradients: "
                  "at the optimizer step, and their peak, sampled at every bucket-buffer allocation); "
                  "peak RSS of the steady steps. "
                  "Step s: best steady step.", ""]
        for name, res_ in z.items():
            lines += [f"### {name} config ({res_['params'] / 1e6:.1f}M params)", ""]
            lines += _table(["mode", "collectives (calls: payload MB)", "ring-sent MB", "/ all-reduce",
                             "optimizer state MB", "/ all-reduce", "grads at step MB", "/ all-reduce",
                             "grads peak MB", "/ all-reduce", "peak RSS MB", "step s"], [
                [mode, "; ".join(f"{k} {c['calls']:.0f}: {c['payload_bytes'] / 2**20:.1f}" for k, c in sorted(m["per_kind"].items())),
                 f"{m['ring_sent_mb']:.1f}", f"{m['over_allreduce']['ring_sent_mb']:.3f}",
                 f"{m['optimizer_state_mb']:.1f}", f"{m['over_allreduce']['optimizer_state_mb']:.3f}",
                 f"{m['grad_at_step_mb']:.1f}", f"{m['over_allreduce']['grad_at_step_mb']:.3f}",
                 f"{m['grad_peak_mb']:.1f}", f"{m['over_allreduce']['grad_peak_mb']:.3f}",
                 f"{m['step_peak_rss_mb']:.0f}", f"{m['step_s']:.2f}"] for mode, m in res_["modes"].items()])
            pad = max(r["padding_bytes"] for r in res_["modes"]["zero2"]["ranks"]) / 2**20
            lines += ["", f"ZeRO-2 bucket padding (segments padded to the largest): {pad:.2f} MB per step.", ""]
    s = res.get("shard")
    if s:
        lines += ["## VPMoE-6B shards under a fake process group (EP=8 x PP=4, 32 ranks)", ""]
        lines += _table(["rank", "pp rank", "ep rank", "params", "expected (layout arithmetic)", "shard MB (fp32)",
                         "peak RSS MB", "build s"], [
            [x["rank"], x["pp_rank"], x["ep_rank"], f"{x['params']:,}", f"{x['expected_params']:,}",
             f"{x['params_mb']:.0f}", f"{x['peak_rss_mb']:.0f}", f"{x['build_s']:.1f}"] for x in s.values()])
        total = next(iter(s.values()))["total_params"]
        lines += ["", f"Whole model: {total:,} params ({total * 4 / 2**30:.1f} GiB in fp32), which no rank allocates.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=["memory", "pipeline", "recompute", "shard", "overlap", "sequence", "zero2"])
    ap.add_argument("--shard-6b", action="store_true", help="build one rank's shard of vpmoe-6b.yaml (fake process group)")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="with --shard-6b: print the result as JSON too")
    ap.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        kind, *rest = args._child
        if kind == "pipeline":
            _pipeline_child(*rest)
        elif kind == "overlap":
            _overlap_child(*rest)
        elif kind == "sequence":
            _sequence_child(*rest)
        elif kind == "zero2":
            _zero2_child(*rest)
        else:
            _recompute_child(*rest)
        return 0
    if args.shard_6b:
        r = shard_6b(args.rank)
        print(f"shard-6b rank {r['rank']}: params {r['params']}, peak_rss_mb {r['peak_rss_mb']:.0f}, "
              f"build_s {r['build_s']:.1f}")
        if args.json:
            print(json.dumps(r))
        return 0
    sections = args.only or ["shard", "recompute", "pipeline", "overlap", "sequence", "zero2", "memory"]
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sections:
            t0 = time.perf_counter()
            res[name] = {"shard": lambda: bench_shards(), "recompute": lambda: bench_recompute(Path(tmp)),
                         "pipeline": lambda: bench_pipeline(Path(tmp)), "memory": lambda: bench_memory(Path(tmp)),
                         "overlap": lambda: bench_overlap(Path(tmp)),
                         "sequence": lambda: bench_sequence(Path(tmp)),
                         "zero2": lambda: bench_zero2(Path(tmp))}[name]()
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    old = json.loads((RESULTS / "scale.json").read_text()) if (RESULTS / "scale.json").is_file() else {}
    old.update(res)  # --only re-measures some sections and keeps the others
    (RESULTS / "scale.json").write_text(json.dumps(old, indent=1) + "\n")
    (RESULTS / "scale.md").write_text(_markdown(old) + "\n")
    print(_markdown(old))
    return 0


if __name__ == "__main__":
    sys.exit(main())
