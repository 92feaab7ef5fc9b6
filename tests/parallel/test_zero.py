"""The distributed optimizer: row-split state all-gathered by the next forward, gradients reduce-scattered (ZeRO-2), parity and checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.distributed import full_gradient, run_distributed
from helpers.engine_loss import token_mean_step


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
            opt = DistributedOptimizer(opt, pm)
        token_mean_step(pm, batch)
        opt.step()
        opt.zero_grad()
        if zero:
            launched = sorted({gather.layer for gather in opt._pending})
            out["in_flight"] = sum(gather.work is not None for gather in opt._pending)
            embedding = pm.module.embedding.weight
            rows = opt.state_of(embedding)["exp_avg"].shape[0]
            hidden = pm.module.embedding(ids[:, :-1])  # waits for the gather outside the layers only
            after_embedding = sorted({gather.layer for gather in opt._pending})
            pm.module.run_layers(hidden, pm.module.default_positions(ids[:, :-1]), layer_numbers=[0])
            after_layer0 = sorted({gather.layer for gather in opt._pending})  # layer 0's too
            pm.module(ids[:, :-1])  # the rest on the way
            out.update(launched=launched, after_embedding=after_embedding, after_layer0=after_layer0,
                       left=len(opt._pending), rows=rows)
        out["zero" if zero else "plain"] = {k: v.detach().numpy().copy() for k, v in pm.module.state_dict().items()}
    return out


def test_row_gather_is_launched_by_the_step_and_finished_by_the_next_forward():
    """One all-gather per decoder layer (after one for the embedding, final norm and output
    layer), each waited for by its own layer's forward, not all at the first module; two are
    launched ahead."""
    results = run_distributed(_body, 2)
    for r in results:
        assert r["launched"] == [0, 1, 2] and r["after_embedding"] == [1, 2] and r["after_layer0"] == [2]
        assert r["in_flight"] == 2  # the step launches two; each wait launches the next
        assert r["left"] == 0
        assert r["rows"] == -(-61 // 2) or r["rows"] == 61 - (-(-61 // 2))  # 31 / 30 rows each
        for key, plain in r["plain"].items():
            assert np.array_equal(plain, r["zero"][key]), key  # bit for bit the unsharded update
    assert sorted(r["rows"] for r in results) == [30, 31]


# -- ZeRO-2: gradients reduce-scattered to the optimizer's split ------------------------------------
STEPS, CLIP, LR = 3, 0.05, 1e-3  # a clip below every step's norm: the clipped path is what runs


def _micro_batches(ctx_dp, dp_rank, seqs=1):
    """This DP rank's sequences of the 4-sequence global batch, ``seqs`` per micro-batch (DP=2 and
    1: two micro-batches per rank, so gradients accumulate before the reduce-scatter)."""
    from helpers.model_configs import global_batch
    from helpers.model_configs import tiny_parallel_cfg as tiny_cfg

    ids, labels = global_batch(tiny_cfg())
    per = 4 // ctx_dp
    return [{"input_ids": ids[i:i + seqs], "labels": labels[i:i + seqs]}
            for i in range(per * dp_rank, per * dp_rank + per, seqs)]


def _train_steps(pm, opt, mbs):
    """STEPS clipped AdamW steps, then one more forward+backward: the losses and grad norms of all
    four, and the last (clipped) gradients left in place."""
    from megatron_vpmoe.training.optimizer import clip_gradients

    losses, norms = [], []
    for step in range(STEPS + 1):
        loss, _ = token_mean_step(pm, mbs)
        norm = clip_gradients(pm.grad_tensors(), CLIP, total_norm=pm.grad_norm())
        losses.append(loss)
        norms.append(float(norm))
        if step < STEPS:
            opt.step()
            opt.zero_grad()
    return losses, norms


def _zero2_body(rank, world, layout, seqs):
    from megatron_vpmoe.config.schema import OptimizerConfig, ParallelConfig
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    from megatron_vpmoe.parallel.zero import DistributedOptimizer
    from megatron_vpmoe.training.optimizer import build_optimizer
    from helpers.distributed import gathered_state
    from helpers.model_configs import SEED
    from helpers.model_configs import tiny_parallel_cfg as tiny_cfg

    # small buckets: several reduce-scatters, launched during backward, buffers freed as they finish
    ctx = init_parallel(ParallelConfig(**layout, distributed_optimizer=True, bucket_mb=0.002))
    pm = build_parallel_model(tiny_cfg(), ctx, seed=SEED)
    opt = DistributedOptimizer(build_optimizer(pm.module, OptimizerConfig(lr=LR)), pm)
    trace = []
    pm.gradients.observer = lambda event, index: trace.append(event)
    losses, norms = _train_steps(pm, opt, _micro_batches(ctx.dp, ctx.dp_rank, seqs))
    weights = {k: v.detach().numpy().copy() for k, v in gathered_state(pm).items()}
    sync = pm.gradients.sync
    finishes = [i for i, event in enumerate(trace) if event == "finish"]
    last_step = trace[finishes[-2] + 1:]  # the last forward+backward's events
    split = {id(p) for p in sync.params}
    # what this rank holds: its parts only; the others' gradients are nowhere on it
    held_parts = sum(t.grad.numel() for t, p, s in pm.held_gradients() if s and t.grad is not None)
    no_full_grad = all(p.grad is None for p in pm.module.parameters()
                       if id(p) in split and opt.gradient_shard(p)[1] is not p)
    split_numel = sum(p.numel() for p in sync.params)
    full = [full_gradient(pm, opt, p) for p in pm.module.parameters()]  # every rank, module order
    for p, grad in zip(pm.module.parameters(), full):
        p.data = grad
    grads = {k: v.numpy().copy() for k, v in gathered_state(pm).items() if not k.endswith("expert_bias")}
    return {"losses": losses, "norms": norms, "weights": weights, "grads": grads, "held": held_parts,
            "split_numel": split_numel, "no_full_grad": no_full_grad,
            "reduce_scatter": all(b.sharded for b in sync.buckets) and len(sync.buckets) > 2,
            "trace": last_step}


def _zero2_reference(seqs):
    """The same steps in one process on the whole global batch (4 micro-batches), no ZeRO."""
    from megatron_vpmoe.config.schema import OptimizerConfig, ParallelConfig
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    from megatron_vpmoe.training.optimizer import build_optimizer
    from helpers.model_configs import SEED
    from helpers.model_configs import tiny_parallel_cfg as tiny_cfg

    pm = build_parallel_model(tiny_cfg(), init_parallel(ParallelConfig()), seed=SEED)
    opt = build_optimizer(pm.module, OptimizerConfig(lr=LR))
    losses, norms = _train_steps(pm, opt, _micro_batches(1, 0, seqs))
    weights = {k: v.detach().clone() for k, v in pm.module.state_dict().items()}
    grads = {k: p.grad.clone() for k, p in pm.module.named_parameters() if not k.endswith("expert_bias")}
    return losses, norms, weights, grads


def _close(got, ref, what):
    diff = (torch.as_tensor(got) - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
    assert diff < 1e-5, (what, float(diff))


@pytest.mark.parametrize("layout,world,seqs", [
    ({}, 2, 1), ({}, 2, 2), ({"pipeline": 2}, 4, 1),
    pytest.param({"tensor": 2, "sequence_parallel": True}, 4, 1, marks=pytest.mark.long)],
    ids=["dp2-accumulate", "dp2", "pp2-dp2", "tp2-sp-dp2"])
def test_zero2_reduce_scatter_matches_single_process(layout, world, seqs):
    """ZeRO-2 at DP=2 (alone, beside PP=2, beside TP=2 with sequence parallel): gradients
    reduce-scattered (accumulated over 2 micro-batches into kept buffers, reduced in place; or one
    micro-batch, buffers freed as their reduce-scatters finish), the global norm from the parts,
    clipped, 3 AdamW steps: the single process's losses, norms, weights and 4th-step gradients
    within 1e-5; each rank holds about half of the reduce-scattered gradient and no full
    gradient; the first reduce-scatter starts before backward ends, and without accumulation the
    first bucket's full buffer is freed before it ends too."""
    ref_losses, ref_norms, ref_weights, ref_grads = _zero2_reference(seqs)
    assert min(ref_norms) > CLIP
    results = run_distributed(_zero2_body, world, layout, seqs)
    merged_w, merged_g = {}, {}
    for r in results:
        assert r["reduce_scatter"] and r["no_full_grad"]
        assert r["trace"].index("launch") < r["trace"].index("backward_done")  # overlapped with backward
        if seqs == 2:  # one micro-batch per rank: buffers freed during backward
            assert r["trace"].index("done") < r["trace"].index("backward_done")
        else:  # accumulated: kept, no waits inside backward
            assert "done" not in r["trace"]
        assert abs(r["held"] - r["split_numel"] / 2) <= 0.1 * r["split_numel"] / 2, (r["held"], r["split_numel"])
        for got, ref in zip(r["losses"], ref_losses):
            assert abs(got - ref) <= 1e-5 * abs(ref), (r["losses"], ref_losses)
        for got, ref in zip(r["norms"], ref_norms):
            assert abs(got - ref) <= 1e-5 * abs(ref), (r["norms"], ref_norms)
        merged_w.update(r["weights"])  # pipeline stages hold disjoint layers
        merged_g.update(r["grads"])
    assert set(merged_w) == set(ref_weights) and set(merged_g) == set(ref_grads)
    for key, ref in ref_weights.items():
        _close(merged_w[key], ref, key)
    for key, ref in ref_grads.items():
        _close(merged_g[key], ref, key)


def _one_step(pm, opt, mbs):
    from megatron_vpmoe.training.optimizer import clip_gradients

    loss, _ = token_mean_step(pm, mbs)
    clip_gradients(pm.grad_tensors(), CLIP, total_norm=pm.grad_norm())
    opt.step()
    opt.zero_grad()
    return loss


def _engine(zero, seed):
    from megatron_vpmoe.config.schema import OptimizerConfig, ParallelConfig
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    from megatron_vpmoe.parallel.zero import DistributedOptimizer
    from megatron_vpmoe.training.optimizer import build_optimizer
    from helpers.model_configs import tiny_parallel_cfg as tiny_cfg

    ctx = init_parallel(ParallelConfig(distributed_optimizer=zero))
    pm = build_parallel_model(tiny_cfg(), ctx, seed=seed)
    opt = build_optimizer(pm.module, OptimizerConfig(lr=LR))
    if zero:
        opt = DistributedOptimizer(opt, pm)
    return ctx, pm, opt


def _resume_zero2(rank, world, root):
    """Load the one-process step-1 checkpoint into ZeRO-2 at DP=2 (other initial weights), take
    step 2, save it."""
    from megatron_vpmoe.training.checkpoint import CheckpointManager

    ctx, pm, opt = _engine(True, seed=99)
    manager = CheckpointManager(f"{root}/ckpt")
    assert manager.load(f"{root}/ckpt", pm, opt)["step"] == 1  # its latest
    loss = _one_step(pm, opt, _micro_batches(ctx.dp, ctx.dp_rank))
    manager.save(2, pm, opt, {})
    manager.finalize()
    return loss


def test_zero2_checkpoint_moves_between_one_process_and_dp2(tmp_path):
    """One process (no ZeRO) step 1 -> checkpoint -> ZeRO-2 at DP=2 step 2 -> checkpoint -> one
    process steps 3 and 4: the losses of one uninterrupted run within 1e-5 (the optimizer state moves
    both ways, split by rows over the DP ranks in between)."""
    from megatron_vpmoe.training.checkpoint import CheckpointManager
    from helpers.model_configs import SEED

    ctx, pm, opt = _engine(False, SEED)
    mbs = _micro_batches(1, 0)
    straight = [_one_step(pm, opt, mbs) for _ in range(4)]
    _, pm, opt = _engine(False, SEED)
    _one_step(pm, opt, mbs)
    CheckpointManager(tmp_path / "ckpt").save(1, pm, opt, {})
    second = run_distributed(_resume_zero2, 2, str(tmp_path))
    _, pm, opt = _engine(False, seed=98)
    assert CheckpointManager(tmp_path / "ckpt").load(tmp_path / "ckpt", pm, opt)["step"] == 2
    last = [_one_step(pm, opt, mbs) for _ in range(2)]  # the 4th loss needs the ZeRO-2 run's state
    for loss in second:
        assert abs(loss - straight[1]) <= 1e-5 * abs(straight[1]), (second, straight)
    for got, want in zip(last, straight[2:]):
        assert abs(got - want) <= 1e-5 * abs(want), (last, straight)
