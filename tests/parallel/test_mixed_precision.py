"""bf16 working weights over fp32 master weights (parallel/mixed_precision.py): the weights are
fp32 at rest and bf16 for forward/backward (routers fp32), the gradients accumulate over
micro-batches into fp32 slots, and the step equals autocast's up to bf16 rounding."""

from __future__ import annotations

from dataclasses import replace

import torch

from helpers.model_configs import global_batch as batch
from helpers.model_configs import tiny_parallel_cfg
from megatron_vpmoe.model import VpmoeModel
from megatron_vpmoe.parallel.mixed_precision import Bf16Weights, keeps_fp32

BF16 = torch.bfloat16


def _model():
    torch.manual_seed(0)
    return VpmoeModel(replace(tiny_parallel_cfg(), moe_aux_loss_coeff=0.0))


def _halves(ids, labels):
    return [(ids[:1], labels[:1]), (ids[1:], labels[1:])]


def test_bf16_during_the_step_fp32_master_and_gradients_after():
    model = _model()
    ids, labels = batch(model.cfg)
    master = {n: p.detach().clone() for n, p in model.named_parameters()}
    routers = {id(p) for p in keeps_fp32(model)}
    assert routers  # the MoE layers' router weights
    weights = Bf16Weights(model)
    seen = []
    model.layers[next(iter(model.layers.keys()))].register_forward_pre_hook(
        lambda m, args: seen.append({p.dtype for p in m.parameters()}))
    weights.begin()
    for p in model.parameters():  # matrices bf16; routers and 1-D parameters (norms, biases, sinks) fp32
        assert p.dtype == (torch.float32 if id(p) in routers or p.dim() < 2 else BF16)
    assert {id(p) for p in weights.params} == {id(p) for p in model.parameters()
                                                if p.dim() >= 2 and id(p) not in routers}
    with torch.autocast("cpu", dtype=BF16):
        for ids_, labels_ in _halves(ids, labels):
            model(ids_, labels=labels_).sum().backward()
            # autograd's bf16 .grad went into the fp32 slot and was freed
            assert all(p.grad is None for p in weights.params)
    weights.end()
    assert seen == [{BF16, torch.float32}] * 2  # layer 0 (dense): bf16 matrices, fp32 norms, both micro-batches
    for n, p in model.named_parameters():  # the master is untouched: same storage values, fp32
        assert p.dtype == torch.float32 and torch.equal(p.detach(), master[n]), n
        assert p.grad is not None and p.grad.dtype == torch.float32, n
    # the same two micro-batches through autocast over the fp32 weights: gradients within bf16 rounding
    ref = _model()
    with torch.autocast("cpu", dtype=BF16):
        for ids_, labels_ in _halves(ids, labels):
            ref(ids_, labels=labels_).sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max().clamp_min(1e-6)
        assert (p.grad - q.grad).abs().max() <= 0.05 * scale, n


def test_one_cast_per_weight_and_nothing_left_behind():
    model = _model()
    weights = Bf16Weights(model)
    routers = {id(q) for q in keeps_fp32(model)}
    assert weights.bf16_bytes() == 2 * sum(p.numel() for p in model.parameters()
                                           if p.dim() >= 2 and id(p) not in routers)
    before = [p.detach().data_ptr() for p in model.parameters()]
    weights.begin()
    working = [p.detach().data_ptr() for p in model.parameters()]
    weights.end()
    weights.begin()  # the working copies are reused step to step, not allocated again
    assert [p.detach().data_ptr() for p in model.parameters()] == working
    weights.end()
    assert [p.detach().data_ptr() for p in model.parameters()] == before
    weights.remove()
