"""TP=2, EP=2, DP=2 over gloo: same loss and gradients as the single-process model on the same batch."""

from __future__ import annotations

import pytest
import torch

from helpers.distributed import gathered_state, run_distributed
from megatron_vpmoe.config.schema import ParallelConfig
from helpers.engine_loss import token_mean_step
from helpers.model_configs import SEED, global_batch
from helpers.model_configs import locked_parallel_cfg as locked_cfg
from helpers.model_configs import tiny_parallel_cfg as tiny_cfg


def single_process_reference(cfg):
    """Loss sum and gradients of the global batch as two micro-batches in one process."""
    from megatron_vpmoe.model import VpmoeModel
    torch.manual_seed(SEED)
    model = VpmoeModel(cfg)
    ids, labels = global_batch(cfg)
    n = float((labels != -100).sum())
    loss_sum = 0.0
    for half in (slice(0, 2), slice(2, 4)):  # two micro-batches: the aux loss is per micro-batch
        per_token = model(ids[half], labels=labels[half])
        (per_token.sum() / n + model.aux_loss() / 2).backward()
        loss_sum += float(per_token.detach().sum())
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    return loss_sum, grads


def _rank_body(rank, world, layout):
    torch.manual_seed(0)
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    cfg = tiny_cfg()
    ctx = init_parallel(ParallelConfig(**layout))
    pm = build_parallel_model(cfg, ctx, seed=SEED)
    ids, labels = global_batch(cfg)
    if ctx.dp > 1:  # this rank's half of the global batch, one micro-batch
        mbs = [{"input_ids": ids[2 * ctx.dp_rank:2 * ctx.dp_rank + 2],
                "labels": labels[2 * ctx.dp_rank:2 * ctx.dp_rank + 2]}]
    else:
        mbs = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    from megatron_vpmoe.model import VpmoeModel
    torch.manual_seed(SEED)
    initial = VpmoeModel(cfg).state_dict()
    gathered = gathered_state(pm)  # shards gathered back equal the single-process weights
    assert set(gathered) == set(initial)
    assert all(torch.equal(gathered[k], initial[k]) for k in initial)
    loss_sum, n_tokens = token_mean_step(pm, mbs)
    for p in pm.parameters():
        p.data = p.grad  # gather gradients through the state-dict path
    # numpy arrays: tensors would travel through shared memory that dies with this process
    grads = {k: v.numpy().copy() for k, v in gathered_state(pm).items() if not k.endswith("expert_bias")}
    load = pm.expert_load()
    pm.update_expert_bias()
    return loss_sum, n_tokens, grads, load.sum().item()


@pytest.mark.parametrize("layout", [
    {"expert": 2}, {"tensor": 2}, {"tensor": 2, "sequence_parallel": True}, {}],
    ids=["ep2", "tp2", "tp2-sp", "dp2"])
def test_two_process_layout_matches_single_process(layout):
    cfg = tiny_cfg()
    ref_loss, ref_grads = single_process_reference(cfg)
    results = run_distributed(_rank_body, 2, layout)
    for loss_sum, n_tokens, grads, load in results:
        grads = {k: torch.from_numpy(v) for k, v in grads.items()}
        assert n_tokens == 22
        assert abs(loss_sum - ref_loss) / abs(ref_loss) < 1e-5
        assert set(grads) == set(ref_grads)
        for key, ref in ref_grads.items():
            diff = (grads[key] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
            assert diff < 1e-5, (key, float(diff))
        assert load == 2 * 24 * cfg.moe_router_topk  # 2 MoE layers x 24 tokens x top-2
    # replicas agree
    for key in ref_grads:
        assert (results[0][2][key] == results[1][2][key]).all(), key


def test_cpu_compat_redirects_current_device_only_in_megatron_core_and_only_without_gpu(caplog, monkeypatch):
    import logging

    from megatron.core.tensor_parallel import layers

    from megatron_vpmoe.parallel import cpu_compat
    real = torch.cuda.current_device
    monkeypatch.setattr(cpu_compat, "_logged", False)  # as in a fresh process
    try:
        with caplog.at_level(logging.INFO, logger=cpu_compat.__name__):
            active = cpu_compat.enable()
            cpu_compat.enable()
        assert active == (not torch.cuda.is_available())
        if active:  # megatron-core's placement call now resolves to the CPU
            assert torch.empty(1, device=layers.torch.cuda.current_device()).device.type == "cpu"
            assert layers.torch.nn.Linear is torch.nn.Linear  # everything else is torch's own
        assert torch.cuda.current_device is real  # the rest of the process keeps the real one
        logged = [r for r in caplog.records if r.name == cpu_compat.__name__]
        assert len(logged) == (1 if active else 0)  # two enables, one line
    finally:
        cpu_compat.disable()
    assert layers.torch is torch


def test_layout_errors_name_the_key():
    from megatron_vpmoe.utils.errors import ConfigError
    cfg = tiny_cfg()
    with pytest.raises(ConfigError, match="parallel.expert"):
        ParallelConfig(expert=3).validate(cfg)
    with pytest.raises(ConfigError, match="parallel.sequence_parallel.*parallel.tensor > 1"):
        ParallelConfig(sequence_parallel=True).validate(cfg)


def _pipeline_body(rank, world):
    from dataclasses import replace
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    cfg = replace(tiny_cfg(), moe_aux_loss_coeff=0.0)
    ctx = init_parallel(ParallelConfig(pipeline=2))
    pm = build_parallel_model(cfg, ctx, seed=SEED)
    ids, labels = global_batch(cfg)
    mbs = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    loss_sum, n_tokens = token_mean_step(pm, mbs)
    grads = {k: p.grad.numpy().copy() for k, p in pm.named_parameters()}
    return loss_sum, n_tokens, grads, pm.module.layer_numbers


def test_pipeline_two_stages_match_single_process():
    from dataclasses import replace
    cfg = replace(tiny_cfg(), moe_aux_loss_coeff=0.0)
    ref_loss, ref_grads = single_process_reference(cfg)
    results = run_distributed(_pipeline_body, 2)
    assert [r[3] for r in results] == [[0, 1], [2]]
    assert_stages_match(((r[0], r[1], r[2]) for r in results), ref_loss, ref_grads)


def assert_stages_match(results, ref_loss, ref_grads):
    """Every rank's loss equals the reference's and the union of the ranks' gathered gradients
    (pipeline stages hold disjoint layers) equals the reference gradients, within 1e-5."""
    merged = {}
    for loss_sum, n_tokens, grads in results:
        assert n_tokens == 22 and abs(loss_sum - ref_loss) / abs(ref_loss) < 1e-5
        merged.update({k: torch.from_numpy(v) for k, v in grads.items()})
    assert set(merged) == set(ref_grads)
    for key, ref in ref_grads.items():
        diff = (merged[key] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
        assert diff < 1e-5, (key, float(diff))


def _locked_body(rank, world, layout):
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    cfg = locked_cfg()
    ctx = init_parallel(ParallelConfig(**layout))
    pm = build_parallel_model(cfg, ctx, seed=SEED)
    # KV-cache decoding through the engine (TPA factor caches per TP rank, v_first stage to stage)
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.model.generation import generate as reference_generate
    from megatron_vpmoe.parallel.generation import generate
    torch.manual_seed(SEED)
    prompts = [[3, 4, 5, 6], [7, 8, 9, 10]]
    assert generate(pm, prompts, 6) == reference_generate(VpmoeModel(cfg), prompts, 6)
    ids, labels = global_batch(cfg)
    halves = [slice(0, 2), slice(2, 4)]
    if ctx.dp > 1:  # this rank's half of the global batch
        halves = halves[ctx.dp_rank:ctx.dp_rank + 1]
    mbs = [{"input_ids": ids[h], "labels": labels[h]} for h in halves]
    loss_sum, n_tokens = token_mean_step(pm, mbs)
    for p in pm.parameters():
        p.data = p.grad  # gather gradients through the state-dict path (TP and EP shards)
    grads = {k: v.numpy().copy() for k, v in gathered_state(pm).items() if not k.endswith("expert_bias")}
    return loss_sum, n_tokens, grads


@pytest.mark.parametrize("layout,world", [
    ({"tensor": 2}, 2), ({"tensor": 2, "sequence_parallel": True}, 2), ({"pipeline": 2}, 2),
    pytest.param({"expert": 2}, 2, marks=pytest.mark.long),
    pytest.param({"tensor": 2, "pipeline": 2}, 4, marks=pytest.mark.long)],
    ids=["tp2", "tp2-sp", "pp2", "ep2", "tp2xpp2"])
def test_locked_attention_matches_single_process(layout, world):
    """TPA (heads split over TP, dim factors replicated with partial gradients), GRAPE-M, ALiBi
    slopes per TP rank, TPA-factor v_first sent between pipeline stages; experts over EP. Loss and
    gradients of one step, and greedy KV-cache decoding through the engine."""
    cfg = locked_cfg()
    ref_loss, ref_grads = single_process_reference(cfg)
    assert_stages_match(run_distributed(_locked_body, world, layout), ref_loss, ref_grads)
