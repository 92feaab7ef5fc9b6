"""Bucketed data-parallel gradient reduction: launched during backward, same gradients as one reduction after it."""

from __future__ import annotations

from dataclasses import replace

import torch

from helpers.distributed import run_distributed
from megatron_vpmoe.config.schema import ParallelConfig
from helpers.model_configs import SEED, global_batch
from helpers.model_configs import tiny_parallel_cfg as tiny_cfg
from helpers.engine_loss import token_mean_step


def _body(rank, world, overlap):
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    cfg = replace(tiny_cfg(), num_layers=4)
    ctx = init_parallel(ParallelConfig(overlap_grad_reduce=overlap, bucket_mb=0.002))
    pm = build_parallel_model(cfg, ctx, seed=SEED)
    ids, labels = global_batch(cfg)
    mine = slice(2 * ctx.dp_rank, 2 * ctx.dp_rank + 2)
    mbs = [{"input_ids": ids[mine][i:i + 1], "labels": labels[mine][i:i + 1]} for i in range(2)]
    out, trace = {}, []
    pm.gradients.observer = lambda event, index: trace.append((event, index))
    for step in range(2):  # the second step reuses the buckets
        trace.clear()  # the last step's events
        token_mean_step(pm, mbs)
        out[step] = {k: p.grad.numpy().copy() for k, p in pm.named_parameters()}
        for p in pm.parameters():
            p.grad = None
    sync = pm.gradients.sync or None
    return out, trace, len(sync.buckets) if sync else 0


def test_overlapped_buckets_launch_during_backward_and_match():
    overlapped = run_distributed(_body, 2, True)
    plain = run_distributed(_body, 2, False)
    for (grads, trace, buckets), (ref, ref_trace, _) in zip(overlapped, plain):
        assert buckets > 2 and not ref_trace
        kinds = [k for k, _ in trace]
        assert kinds.index("launch") < kinds.index("backward_done")  # overlapped with backward
        assert kinds.count("launch") == buckets and kinds[-1] == "finish"
        for step in (0, 1):
            for key, g in ref[step].items():
                assert torch.equal(torch.from_numpy(grads[step][key]), torch.from_numpy(g)), (step, key)
    # replicas hold the same reduced gradients
    for key in overlapped[0][0][0]:
        assert (overlapped[0][0][0][key] == overlapped[1][0][0][key]).all()
