"""Sharded checkpoint writes on 4 gloo processes (TP=2 x EP=2, ZeRO-2 over the 2 data-parallel
ranks): every rank writes its own part, the files hold one copy of the state (DP replicas
deduplicated), a save raises a rank's memory by far less than its shard state (nothing is
gathered; the async save's staging buffers are allocated once and reused), and the checkpoint
loads back exactly, on the same layout (each rank holding only the optimizer state it owns)
and on one process."""

from __future__ import annotations

import os
import threading
import time

import torch

from helpers.distributed import run_distributed
from helpers.engine_loss import token_mean_step

LAYOUT = {"tensor": 2, "expert": 2, "distributed_optimizer": True}


def _model_cfg():
    from megatron_vpmoe.config.schema import ModelConfig

    # ~5.4M parameters (22 MB fp32): big enough that a gathered copy stands out of the noise
    return ModelConfig(vocab_size=4096, hidden_size=256, num_layers=2, num_attention_heads=4,
                       num_query_groups=2, kv_channels=64, ffn_hidden_size=1024, window_size=8,
                       num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=512,
                       moe_shared_expert_intermediate_size=512, moe_router_num_groups=2,
                       moe_router_group_topk=2)


class _RssPeak:
    """Resident set size sampled every 0.5 ms in a thread (/proc/self/statm): the peak over a block."""

    def __enter__(self):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self._page

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def rise(self) -> int:
        return self.peak - self.start


def _build(ctx, seed):
    from megatron_vpmoe.config.schema import OptimizerConfig
    from megatron_vpmoe.parallel import build_parallel_model
    from megatron_vpmoe.parallel.zero import DistributedOptimizer
    from megatron_vpmoe.training.optimizer import build_optimizer

    pm = build_parallel_model(_model_cfg(), ctx, seed=seed)
    opt = DistributedOptimizer(build_optimizer(pm.module, OptimizerConfig(lr=1e-3)), pm)
    return pm, opt


def _step(pm, opt, ctx):
    g = torch.Generator().manual_seed(ctx.dp_rank)
    ids = torch.randint(0, 4096, (2, 17), generator=g)
    token_mean_step(pm, [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}])
    opt.step()
    opt.zero_grad()


def _state_bytes(pm, opt) -> int:
    params = sum(t.numel() * t.element_size() for t in pm.module.state_dict().values()
                 if isinstance(t, torch.Tensor))
    state = sum(t.numel() * t.element_size() for s in opt.optimizer.state.values() for t in s.values())
    return params + state


def _save_measure_reload(rank, world, root):
    from megatron_vpmoe.config.schema import ParallelConfig
    from megatron_vpmoe.parallel import init_parallel
    from megatron_vpmoe.training.checkpoint import CheckpointManager, load_model_state_dict

    ctx = init_parallel(ParallelConfig(**LAYOUT))
    pm, opt = _build(ctx, seed=1)
    _step(pm, opt, ctx)
    shard = _state_bytes(pm, opt)
    sync = CheckpointManager(f"{root}/sync", keep_last=0)
    sync.save(1, pm, opt, {})  # warm-up: imports, DCP's first-use setup
    with _RssPeak() as sync_save:
        sync.save(2, pm, opt, {})
    asynchronous = CheckpointManager(f"{root}/async", keep_last=0, async_save=True)
    rises = []
    for step in (1, 2):  # the first allocates the staging buffers, the second reuses them
        with _RssPeak() as peak:
            asynchronous.save(step, pm, opt, {})
            asynchronous.finalize()
        rises.append(peak.rise)
    asynchronous.close()

    # a differently initialised model and a fresh optimizer get everything back from the checkpoint
    pm2, opt2 = _build(ctx, seed=2)
    sync.load(f"{root}/sync", pm2, opt2)
    same_weights = all(torch.equal(v, pm2.module.state_dict()[k]) for k, v in pm.module.state_dict().items()
                       if isinstance(v, torch.Tensor))
    owned = {p for p in pm2.module.parameters() if opt2.owns(p)}
    only_owned = {opt2.param_of(t) for t in opt2.optimizer.state} == owned
    by_name = dict(pm.module.named_parameters())
    same_state = all(torch.equal(opt.state_of(by_name[n])[k], v)
                     for n, p in pm2.module.named_parameters() if p in owned
                     for k, v in opt2.state_of(p).items())
    # the single-process view of the checkpoint equals the gathered shards
    from torch.distributed.tensor import DTensor

    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in pm.sharded_state_dict().items()}
    torch.distributed.barrier()
    one_process = load_model_state_dict(f"{root}/sync") if rank == 0 else None
    same_full = one_process is None or (one_process.keys() == full.keys()
                                        and all(torch.equal(one_process[k], full[k]) for k in full))
    # the whole single-process state, to size "one copy" of it
    full_bytes = sum(t.numel() * t.element_size() for t in full.values())
    return dict(shard=shard, sync_rise=sync_save.rise, async_rises=rises, same_weights=same_weights,
                only_owned=only_owned, owned=len(owned), same_state=same_state, same_full=same_full,
                full_model_bytes=full_bytes)


def test_each_rank_writes_its_own_shards_without_gathering(tmp_path, monkeypatch):
    # large allocations straight from mmap, so freed memory is returned and new memory shows in RSS
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    results = run_distributed(_save_measure_reload, 4, str(tmp_path))
    ckpt = tmp_path / "sync" / "step_00000002"
    files = {p.name: p.stat().st_size for p in ckpt.glob("*.distcp")}
    print("\nper-rank .distcp bytes:", dict(sorted(files.items())))
    for rank, r in enumerate(results):
        print(f"rank {rank}: shard state {r['shard'] / 2**20:.1f} MiB, sync save rise "
              f"{r['sync_rise'] / 2**20:.1f} MiB, async save rises "
              f"{[round(x / 2**20, 1) for x in r['async_rises']]} MiB")
    # every rank wrote its own file
    assert sorted(files) == [f"__{r}_0.distcp" for r in range(4)]
    assert all(size > 1 << 20 for size in files.values())
    # one copy of the state: the model (full size) plus AdamW's two moments of every parameter,
    # not one copy per data-parallel replica
    model = results[0]["full_model_bytes"]
    total = sum(files.values())
    assert 2.9 * model < total < 3.1 * model, (total, model)
    for r in results:
        assert r["same_weights"] and r["same_state"] and r["same_full"]
        assert r["only_owned"] and r["owned"] > 0
        assert r["sync_rise"] <= 0.3 * r["shard"], r
        first, *reused = r["async_rises"]
        assert first <= 1.3 * r["shard"], r  # the staging copy of this rank's shard state
        assert all(x <= 0.3 * r["shard"] for x in reused), r
