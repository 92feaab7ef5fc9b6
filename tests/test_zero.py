"""ZeRO-1's row-split parameters: the updated rows' all-gather is launched at the end of the step
and finished by the next forward's first use; the weights then equal an unsharded AdamW step's,
and each rank holds its rows' state only."""

from __future__ import annotations

import numpy as np
import torch

from distributed import run_distributed
from engine_loss import token_mean_step


def _cfg():
    from megatron_vpmoe.config.schema import ModelConfig

    return ModelConfig(vocab_size=61, hidden_size=16, num_layers=2, num_attention_heads=4, num_query_groups=2,
                       kv_channels=8, ffn_hidden_size=32, window_size=3, num_moe_experts=4, moe_router_topk=2,
                       moe_ffn_hidden_size=8, moe_shared_expert_intermediate_size=8, moe_router_num_groups=2,
                       moe_router_group_topk=2)


def _body(rank, world):
    from megatron_vpmoe.config.schema import OptimizerConfig, ParallelConfig
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    from megatron_vpmoe.parallel.zero import DistributedOptimizer
    from megatron_vpmoe.training.optimizer import build_optimizer

    ctx = init_parallel(ParallelConfig())
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 61, (2, 9), generator=g)
    batch = [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]
    out = {}
    for zero in (False, True):
        pm = build_parallel_model(_cfg(), ctx, seed=3)
        opt = build_optimizer(pm.module, OptimizerConfig(lr=1e-2))
        if zero:
            opt = DistributedOptimizer(opt, pm.module, ctx.dp_group, ctx.expert_dp_group)
            pm.shard_gradients(opt.gradient_shard)
        token_mean_step(pm, batch)
        opt.step()
        opt.zero_grad()
        if zero:
            launched = len(opt._pending)
            embedding = pm.module.embedding.weight
            rows = opt.state_of(embedding)["exp_avg"].shape[0]
            pm.module(ids[:, :-1])  # the forward's first use of a row-split parameter waits
            out["launched"], out["left"], out["rows"] = launched, len(opt._pending), rows
        out["zero" if zero else "plain"] = {k: v.detach().numpy().copy() for k, v in pm.module.state_dict().items()}
    return out


def test_row_gather_is_launched_by_the_step_and_finished_by_the_next_forward():
    results = run_distributed(_body, 2)
    for r in results:
        assert r["launched"] >= 1 and r["left"] == 0
        assert r["rows"] == -(-61 // 2) or r["rows"] == 61 - (-(-61 // 2))  # 31 / 30 rows each
        for key, plain in r["plain"].items():
            assert np.array_equal(plain, r["zero"][key]), key  # bit for bit the unsharded update
    assert sorted(r["rows"] for r in results) == [30, 31]
