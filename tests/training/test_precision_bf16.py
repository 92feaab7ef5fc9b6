"""The bf16 training path (``train.precision: bf16``, autocast on CPU): which dtype each piece runs
in (bf16 residual stream, grouped GEMM, all-to-all payloads, pipeline sends; fp32 router, loss,
master weights and gradients), expert-group padding, and the bf16 loss curve against fp32."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from helpers.distributed import run_distributed
from megatron_vpmoe.kernels import ops, reference
from megatron_vpmoe.config.schema import ModelConfig, ParallelConfig
from megatron_vpmoe.model import VpmoeModel
from megatron_vpmoe.model import moe as moe_mod
from megatron_vpmoe.model.moe import GroupedExperts, pad_expert_groups
from helpers.model_configs import global_batch as batch
from helpers.model_configs import tiny_parallel_cfg as parallel_cfg
from helpers.engine_loss import token_mean_step

BF16 = torch.bfloat16


def tiny_cfg(**over) -> ModelConfig:
    """test_parallel's model (sliding + global layers, 1 dense + 2 MoE layers, shared expert, value
    residual, biases), aux loss off unless asked (pipeline parallelism rejects it)."""
    return replace(parallel_cfg(), **{"moe_aux_loss_coeff": 0.0, **over})


class Spy:
    """Wraps ``owner.name`` and records ``what(args, kwargs, result)`` per call (autocast state too)."""

    def __init__(self, monkeypatch, owner, name, what):
        self.calls = []
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            self.calls.append({**what(args, kwargs, out), "autocast": torch.is_autocast_enabled("cpu")})
            return out
        monkeypatch.setattr(owner, name, wrapper)


def _spy_model(monkeypatch):
    spies = {
        "gemm": Spy(monkeypatch, moe_mod, "grouped_matmul",
                    lambda a, k, out: {"x": a[0].dtype, "w": a[1].dtype, "out": out.dtype}),
        "route": Spy(monkeypatch, ops, "route",
                     lambda a, k, out: {"logits": a[0].dtype, "weights": out[0].dtype, "scores": out[2].dtype}),
        "attention": Spy(monkeypatch, ops, "attention",
                         lambda a, k, out: {"q": a[0].dtype, "v": a[2].dtype, "out": out.dtype}),
        "unpermute": Spy(monkeypatch, ops, "unpermute",
                         lambda a, k, out: {"y": a[0].dtype, "w": a[2].dtype, "out": out.dtype}),
        "loss": Spy(monkeypatch, ops, "linear_cross_entropy",
                    lambda a, k, out: {"hidden": a[0].dtype, "weight": a[1].dtype, "out": out.dtype}),
    }
    return spies


def _values(calls, key):
    return {c[key] for c in calls}


def test_bf16_autocast_dtypes_through_the_model(monkeypatch):
    cfg = tiny_cfg(moe_aux_loss_coeff=0.01)
    torch.manual_seed(0)
    model = VpmoeModel(cfg)
    ids, labels = batch(cfg)
    spies = _spy_model(monkeypatch)
    stream = []
    for layer in model.layers.values():
        layer.register_forward_hook(lambda mod, inp, out: stream.append((inp[0].dtype, out[0].dtype, out[1].dtype)))
    with torch.autocast("cpu", dtype=BF16):
        per_token = model(ids, labels=labels)
        (per_token.sum() + model.aux_loss()).backward()
    # bf16 residual stream (every layer's input and output) and layer-0 values (v_first)
    assert stream and set(stream) == {(BF16, BF16, BF16)}
    # attention and the experts' grouped GEMM (weights cast to the activation dtype) in bf16
    assert _values(spies["attention"].calls, "q") == {BF16} == _values(spies["attention"].calls, "out")
    gemm = spies["gemm"].calls
    assert len(gemm) == 2 * 2 and _values(gemm, "x") == _values(gemm, "w") == _values(gemm, "out") == {BF16}
    # router: fp32 logits, scores and weights, computed with autocast off
    route = spies["route"].calls
    assert len(route) == 2 and _values(route, "autocast") == {False}
    assert _values(route, "logits") == _values(route, "scores") == _values(route, "weights") == {torch.float32}
    # the fp32 routing weights meet bf16 expert outputs; the combine is bf16
    assert _values(spies["unpermute"].calls, "y") == {BF16} == _values(spies["unpermute"].calls, "out")
    # LM head: bf16 hidden into the loss GEMM, fp32 per-token loss
    loss = spies["loss"].calls
    assert loss == [{"hidden": BF16, "weight": torch.float32, "out": torch.float32, "autocast": True}]
    assert per_token.dtype == torch.float32
    # fp32 master weights get fp32 gradients
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params.values())


def test_fp32_path_stays_fp32(monkeypatch):
    cfg = tiny_cfg()
    model = VpmoeModel(cfg)
    ids, labels = batch(cfg)
    spies = _spy_model(monkeypatch)
    model(ids, labels=labels).sum().backward()
    for name in ("gemm", "attention", "unpermute"):
        dtypes = {d for c in spies[name].calls for k, d in c.items() if k != "autocast"}
        assert dtypes == {torch.float32}, name
    assert _values(spies["loss"].calls, "hidden") == {torch.float32}


def test_head_gemm_is_bf16_and_softmax_fp32():
    """bf16 hidden: loss and gradients equal cross-entropy of the upcast bf16 GEMM (fp32 softmax),
    and differ measurably from an all-fp32 head, so the GEMM really ran in bf16."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(37, 16, generator=gen).to(BF16).requires_grad_()
    w = (torch.randn(301, 16, generator=gen) * 0.5).requires_grad_()
    labels = torch.randint(0, 301, (37,), generator=gen)
    labels[::5] = -100
    g = torch.rand(37, generator=gen)
    with torch.autocast("cpu", dtype=BF16):  # ignored by the loss: the GEMM dtype is hidden's
        loss = reference.linear_cross_entropy(h, w, labels, chunk_size=8)
    loss.backward(g)
    assert loss.dtype == torch.float32 and h.grad.dtype == BF16 and w.grad.dtype == torch.float32
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    bf16_logits = (h @ w.to(BF16).t()).float()
    expected = F.cross_entropy(bf16_logits, labels, reduction="none")
    expected.backward(g)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-6)
    # bf16 gradient GEMMs, chunk sums in fp32 here and in bf16 in autograd's: 1e-2 of the largest
    for ours, theirs in ((gh, h.grad), (gw, w.grad)):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-2,
                                   atol=1e-2 * float(theirs.abs().max()))
    fp32 = F.cross_entropy(h.detach().float() @ w.detach().t(), labels, reduction="none")
    assert (loss - fp32).abs().max() > 1e-4  # an fp32 GEMM would not match the bf16 one above


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_padded_expert_groups_equal_unpadded(monkeypatch, dtype):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    counts = torch.tensor([3, 0, 9, 2])
    x = torch.randn(int(counts.sum()), cfg.hidden_size).to(dtype)
    padded, padded_counts, rows = pad_expert_groups(x, counts, 8)
    assert padded_counts.tolist() == [8, 0, 16, 8] and padded.shape[0] == 32
    assert rows.tolist() == [0, 1, 2, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, 25]
    assert torch.equal(padded.index_select(0, rows), x)
    keep = torch.zeros(32, dtype=torch.bool).index_fill_(0, rows, True)
    assert not padded[~keep].any()  # the padding rows are zeros
    assert pad_expert_groups(x, counts, 1) == (x, counts, None)

    ex = GroupedExperts(cfg, 4)
    for p in ex.parameters():
        torch.nn.init.normal_(p)

    def run(multiple):
        monkeypatch.setattr(moe_mod, "group_row_alignment", lambda t: multiple)
        ex.zero_grad()
        xi = x.clone().requires_grad_()
        out = ex(xi, counts)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), xi.grad, {n: p.grad.clone() for n, p in ex.named_parameters()}

    out, gx, grads = run(1)
    out_p, gx_p, grads_p = run(8)
    assert out.dtype == dtype and grads["fc1_weight"].dtype == torch.float32
    # same rows, same weights; only the GEMM's blocking may differ with the group sizes
    torch.testing.assert_close(out_p, out)
    torch.testing.assert_close(gx_p, gx)
    for name in grads:  # padding rows add zeros to the weight gradients' sums
        torch.testing.assert_close(grads_p[name], grads[name])


def _single_process_bf16(cfg, mbs):
    torch.manual_seed(7)
    model = VpmoeModel(cfg)
    n = float(sum(int((mb["labels"] != -100).sum()) for mb in mbs))
    total = 0.0
    with torch.autocast("cpu", dtype=BF16):
        for mb in mbs:
            total += float(model(mb["input_ids"], labels=mb["labels"]).detach().sum())
    return total, n


def _halves(ids, labels):
    return [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]


def _grad_dtypes(pm):
    return sorted({str(p.grad.dtype) for p in pm.parameters() if p.grad is not None})


def _expert_parallel_bf16(cfg):
    """EP=2 step under bf16 autocast: the all-to-all payload dtypes, forward and backward."""
    import megatron_vpmoe.parallel.expert as expert_mod
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel

    ctx = init_parallel(ParallelConfig(expert=2))
    pm = build_parallel_model(cfg, ctx, seed=7)
    ids, labels = batch(cfg)
    assert ctx.dp == 2  # EP=2 on 2 ranks: data parallel 2, each rank its half of the batch
    half = slice(2 * ctx.dp_rank, 2 * ctx.dp_rank + 2)
    sent, grads_back = [], []
    original = expert_mod.all_to_all_single

    def spy(output, payload, *args, **kwargs):
        sent.append(str(payload.dtype))
        out = original(output, payload, *args, **kwargs)
        if out.requires_grad:  # what the backward all-to-all sends is this tensor's gradient
            out.register_hook(lambda g: grads_back.append(str(g.dtype)))
        return out
    expert_mod.all_to_all_single = spy
    try:
        with torch.autocast("cpu", dtype=BF16):
            loss_sum, _ = token_mean_step(pm, [{"input_ids": ids[half], "labels": labels[half]}])
    finally:
        expert_mod.all_to_all_single = original
    return {"loss": loss_sum, "sent": sent, "grads_back": grads_back, "grads": _grad_dtypes(pm)}


def _pipeline_bf16(cfg):
    """PP=2 step under bf16 autocast: the dtypes each stage's layers take in and hand on."""
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel

    ctx = init_parallel(ParallelConfig(pipeline=2))
    pm = build_parallel_model(cfg, ctx, seed=7)
    m, seen = pm.module, []
    original = m.run_layers

    def spy(hidden, positions, v_first=None, cache=None, **kwargs):
        out = original(hidden, positions, v_first, cache, **kwargs)
        if hidden.device.type != "meta":
            seen.append((str(hidden.dtype), str(v_first.dtype) if v_first is not None else None,
                         str(out[0].dtype), str(out[1].dtype)))
        return out
    m.run_layers = spy
    with torch.autocast("cpu", dtype=BF16):
        loss_sum, _ = token_mean_step(pm, _halves(*batch(cfg)))
    return {"loss": loss_sum, "seen": seen, "grads": _grad_dtypes(pm)}


def _parallel_body(rank, world):
    cfg = tiny_cfg()
    return _expert_parallel_bf16(cfg), _pipeline_bf16(cfg)


def test_expert_and_pipeline_parallel_carry_bf16():
    """EP=2: both all-to-alls carry bf16 rows, both directions. PP=2: stage 0's outputs (hidden,
    layer-0 values) are bf16, so stage 1 receives bf16. Gradients fp32; losses = one process's."""
    cfg = tiny_cfg()
    ids, labels = batch(cfg)
    ref, _ = _single_process_bf16(cfg, _halves(ids, labels))
    bf = "torch.bfloat16"
    results = run_distributed(_parallel_body, 2)
    for ep, pp in results:
        # 2 MoE layers x (dispatch + combine)
        assert ep["sent"] == [bf] * 4 and ep["grads_back"] == [bf] * 4
        assert ep["grads"] == pp["grads"] == ["torch.float32"]
        assert abs(ep["loss"] - ref) <= 1e-4 * abs(ref), (ep["loss"], ref)
    stage0, stage1 = results[0][1], results[1][1]
    assert stage0["seen"] and set(stage0["seen"]) == {(bf, None, bf, bf)}  # embedding in, bf16 out
    assert stage1["seen"] and set(stage1["seen"]) == {(bf, bf, bf, bf)}  # received hidden, v_first
    assert abs(stage1["loss"] - ref) <= 1e-4 * abs(ref), (stage1["loss"], ref)


def _curves(tmp_path, steps):
    from helpers.train_support import read_metrics, run_training, tiny_config

    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_config(tmp_path / precision, train={"steps": steps, "precision": precision})
        assert run_training(cfg) == 0
        curves[precision] = [r["loss"] for r in read_metrics(tmp_path / precision)]
    return curves["fp32"], curves["bf16"]


def test_bf16_training_tracks_fp32_curve(tmp_path):
    """The real trainer, 50 AdamW steps of the tiny config: bf16 (bf16 weights over fp32 master
    weights, ``train.master_weights``) within 0.5% of fp32 at every step."""
    fp32, bf16 = _curves(tmp_path, 50)
    assert len(fp32) == len(bf16) == 50 and all(math.isfinite(x) for x in bf16)
    assert fp32[-1] < 0.8 * fp32[0]  # it learns, so the curves are compared while moving
    worst = max(abs(b - f) / f for f, b in zip(fp32, bf16))
    assert worst < 0.005, (worst, fp32, bf16)
    assert bf16 != fp32  # the bf16 path really ran in a different precision
