"""Triton kernels against kernels.reference, forward and backward.

On CPU the kernels run in the Triton interpreter: ``triton.jit`` (and Triton's own jitted
``tl.sum``/``tl.max``) pick the interpreter when Triton is imported, so these cases only run in a
process started with ``TRITON_INTERPRET=1``; ``tests/kernels/test_kernels_triton.py`` starts one (run
directly, this module skips), which keeps the variable out of every other test module. With
``VPMOE_KERNEL_TEST_DEVICE=cuda`` (also started by ``tests/kernels/test_kernels_triton.py`` when a GPU is
present) the compiled kernels run on the GPU: inputs are copied to it and results back, and the
reference runs on CPU.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

DEVICE = os.environ.get("VPMOE_KERNEL_TEST_DEVICE", "cpu")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by tests/kernels/test_kernels_triton.py in a TRITON_INTERPRET=1 subprocess",
                allow_module_level=True)
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("VPMOE_KERNEL_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from megatron_vpmoe.kernels import ops, reference  # noqa: E402
from megatron_vpmoe.kernels import (triton_activation, triton_attention, triton_dispatch, triton_loss,  # noqa: E402
                     triton_norm, triton_router)

MODULES = {m.__name__.split(".")[-1]: m for m in (triton_activation, triton_norm, triton_router,
                                                  triton_dispatch, triton_loss, triton_attention)}
PUBLIC = ("squared_relu", "rms_norm", "route", "permute", "unpermute", "attention",
          "linear_cross_entropy")


def _on_device(fn):
    """``fn`` with its tensor arguments moved to DEVICE and its outputs back to CPU (differentiable)."""
    if DEVICE == "cpu":
        return fn

    def move(a, device):
        return a.to(device) if isinstance(a, torch.Tensor) else a

    def wrapped(*args, **kwargs):
        out = fn(*(move(a, DEVICE) for a in args), **{k: move(v, DEVICE) for k, v in kwargs.items()})
        return tuple(move(o, "cpu") for o in out) if isinstance(out, tuple) else move(out, "cpu")
    return wrapped


K = {name: types.SimpleNamespace(**{f: _on_device(getattr(m, f)) for f in PUBLIC if hasattr(m, f)})
     for name, m in MODULES.items()}
(triton_activation, triton_norm, triton_router, triton_dispatch, triton_loss,
 triton_attention) = (K[n] for n in MODULES)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def _close(actual, expected, dtype):
    """fp32: 1e-5. bf16: 1e-2 relative, and 1e-2 of the tensor's largest magnitude absolute (the
    reference rounds each bf16 product and partial sum, so sums that cancel differ by a few ulps
    of their terms, not of their result)."""
    tol = dict(TOL[dtype])
    if dtype == torch.bfloat16 and expected.numel():
        tol["atol"] = tol["atol"] * max(1.0, expected.float().abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def _close_all(actuals, expecteds, dtype):
    assert len(actuals) == len(expecteds)
    for a, e in zip(actuals, expecteds):
        _close(a, e, dtype)


def _grads(fn, inputs, grad_out_seed=0):
    """Output and gradients of ``fn(*inputs)`` (float outputs) for a fixed random cotangent."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor)
              else x for x in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(grad_out_seed)
    float_outs = [o for o in outs if o.is_floating_point()]
    cots = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in float_outs]
    torch.autograd.backward(float_outs, cots)
    return outs, [x.grad for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]


def test_kernels_are_interpreted_on_cpu():
    kind = type(MODULES["triton_norm"]._rms_norm_fwd).__name__
    assert kind == ("InterpretedFunction" if DEVICE == "cpu" else "JITFunction")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 333), (2, 3, 1), (0, 5), (1025,)])
def test_squared_relu(dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (y,), (gx,) = _grads(K["triton_activation"].squared_relu, [x])
    (yr,), (gr,) = _grads(reference.squared_relu, [x])
    _close(y, yr, dtype)
    _close(gx, gr, dtype)
    assert y.dtype == dtype and gx.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 3, 37), (1, 64), (9, 100)])
def test_rms_norm(dtype, shape):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen).to(dtype)
    w = torch.randn(shape[-1], generator=gen)
    (y,), grads = _grads(lambda a, b: K["triton_norm"].rms_norm(a, b, 1e-6), [x, w])
    (yr,), ref = _grads(lambda a, b: reference.rms_norm(a, b, 1e-6), [x, w])
    _close(y, yr, dtype)
    _close_all(grads, ref, dtype)


ROUTE_CASES = [  # tokens, experts, topk, groups, group_topk, score function
    (37, 12, 3, 4, 2, "sigmoid"),
    (5, 7, 2, 1, 1, "sigmoid"),
    (20, 16, 4, 8, 3, "softmax"),
    (9, 6, 1, 6, 2, "sigmoid"),
    (3, 24, 6, 3, 3, "sigmoid"),
    (0, 8, 2, 2, 1, "sigmoid"),
]


@pytest.mark.parametrize("case", ROUTE_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_route(case, with_bias):
    tokens, experts, topk, groups, group_topk, score = case
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(tokens, experts, generator=gen)
    bias = torch.randn(experts, generator=gen) * 0.2 if with_bias else None
    args = (topk, groups, group_topk, 2.5, score)
    (w, i, s), (g,) = _grads(lambda x: K["triton_router"].route(x, bias, *args), [logits])
    (wr, ir, sr), (gr,) = _grads(lambda x: reference.route(x, bias, *args), [logits])
    assert torch.equal(i, ir)
    _close(w, wr, torch.float32)
    _close(s, sr, torch.float32)
    _close(g, gr, torch.float32)


DISPATCH_CASES = [  # tokens, hidden, experts, topk
    (13, 37, 6, 2),
    (1, 300, 4, 3),
    (40, 8, 16, 4),  # most experts get no token
    (0, 8, 4, 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DISPATCH_CASES)
def test_permute_unpermute(dtype, case):
    tokens, hidden, experts, topk = case
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(tokens, hidden, generator=gen).to(dtype)
    # Only even experts are used, so odd experts are empty groups.
    indices = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)]) \
        if tokens else torch.zeros(0, topk, dtype=torch.long)
    indices = (indices // 2) * 2
    weights = torch.rand(tokens, topk, generator=gen)

    def run(impl):
        def fn(x, w):
            permuted, order, counts = impl.permute(x, indices, experts)
            y = permuted.square() + 1.0
            return impl.unpermute(y, order, w, tokens), permuted, order, counts
        return fn

    (out, p, o, c), grads = _grads(run(K["triton_dispatch"]), [h, weights])
    (outr, pr, orr, cr), ref = _grads(run(reference), [h, weights])
    assert torch.equal(p, pr) and torch.equal(o, orr) and torch.equal(c, cr)
    assert (c[1::2] == 0).all()
    _close(out, outr, dtype)
    _close_all(grads, ref, dtype)


LOSS_CASES = [  # tokens, hidden, vocab, chunk
    (13, 16, 2500, 5),
    (7, 8, 33, 4),
    (16, 24, 1030, 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LOSS_CASES)
def test_linear_cross_entropy(dtype, case):
    n, hidden, vocab, chunk = case
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(n, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.5).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::3] = -100
    (loss,), grads = _grads(lambda a, b: K["triton_loss"].linear_cross_entropy(a, b, labels, -100, chunk), [h, w])
    (lossr,), ref = _grads(lambda a, b: reference.linear_cross_entropy(a, b, labels, -100, chunk), [h, w])
    assert loss.dtype == torch.float32 and (loss[::3] == 0).all()
    _close(loss, lossr, dtype)
    _close_all(grads, ref, dtype)


ATTN_CASES = [  # batch, q len, k len, q heads, kv heads, head dim, window, sink
    (1, 37, 37, 4, 2, 24, None, True),
    (2, 45, 45, 2, 1, 16, 13, True),
    (1, 5, 40, 2, 2, 8, 7, False),
    (1, 33, 33, 3, 3, 20, 1, True),
    (1, 1, 19, 4, 1, 16, 6, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention(dtype, case):
    b, sq, sk, hq, hkv, d, window, sink = case
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(b, sq, hq, d, generator=gen).to(dtype)
    k = torch.randn(b, sk, hkv, d, generator=gen).to(dtype)
    v = torch.randn(b, sk, hkv, d, generator=gen).to(dtype)
    inputs = [q, k, v] + ([torch.randn(hq, generator=gen)] if sink else [])

    def run(impl):
        return lambda q_, k_, v_, s_=None: impl.attention(q_, k_, v_, s_, window, 0.3)

    (o,), grads = _grads(run(K["triton_attention"]), inputs)
    (orf,), ref = _grads(run(reference), inputs)
    assert o.dtype == dtype
    _close(o, orf, dtype)
    _close_all(grads, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(1, 37, 37, 4, 2, 16, None), (1, 5, 40, 4, 4, 8, 7)])
def test_attention_alibi(dtype, case):
    """The ALiBi distance bias (GRAPE-A) inside the kernel, forward and backward, full and windowed,
    training shape and decoding against a longer key sequence."""
    b, sq, sk, hq, hkv, d, window = case
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(b, sq, hq, d, generator=gen).to(dtype)
    k = torch.randn(b, sk, hkv, d, generator=gen).to(dtype)
    v = torch.randn(b, sk, hkv, d, generator=gen).to(dtype)
    slopes = 2.0 ** -torch.arange(1, hq + 1, dtype=torch.float32)
    inputs = [q, k, v, torch.randn(hq, generator=gen)]

    def run(impl):
        return lambda q_, k_, v_, s_: impl.attention(q_, k_, v_, s_, window, 0.3, slopes)

    (o,), grads = _grads(run(K["triton_attention"]), inputs)
    (orf,), ref = _grads(run(reference), inputs)
    _close(o, orf, dtype)
    _close_all(grads, ref, dtype)


def test_ops_dispatch_takes_triton_branch(monkeypatch):
    """With the device check forced, every ops.* call reaches its kernel with the same signature."""
    if DEVICE != "cpu":
        pytest.skip("forces the Triton branch for CPU tensors (interpreter only)")
    monkeypatch.setattr(ops, "_use_triton", lambda t: True)
    calls = []
    for module in MODULES.values():
        for attr in PUBLIC:
            if hasattr(module, attr):
                original = getattr(module, attr)
                monkeypatch.setattr(module, attr,
                                    lambda *a, _f=original, _n=attr, **kw: calls.append(_n) or _f(*a, **kw))
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 8, generator=gen)
    _close(ops.rms_norm(x, torch.ones(8)), reference.rms_norm(x, torch.ones(8)), torch.float32)
    _close(ops.squared_relu(x), reference.squared_relu(x), torch.float32)
    w, i, _ = ops.route(x, None, 2, 2, 1, 1.0)
    assert torch.equal(i, reference.route(x, None, 2, 2, 1, 1.0)[1])
    permuted, order, _ = ops.permute(x, i, 8)
    _close(ops.unpermute(permuted, order, w, 6), reference.unpermute(permuted, order, w, 6), torch.float32)
    q = torch.randn(1, 6, 2, 8, generator=gen)
    _close(ops.attention(q, q, q, torch.zeros(2), 3), reference.attention(q, q, q, torch.zeros(2), 3),
           torch.float32)
    labels = torch.randint(0, 8, (6,), generator=gen)
    _close(ops.linear_cross_entropy(x, x[:5].repeat(2, 1), labels),
           reference.linear_cross_entropy(x, x[:5].repeat(2, 1), labels), torch.float32)
    assert sorted(set(calls)) == sorted(["rms_norm", "squared_relu", "route", "permute", "unpermute",
                                         "attention", "linear_cross_entropy"])


@pytest.mark.parametrize("draw", range(8))
def test_random_shapes_all_kernels(draw):
    """Random (mostly non-power-of-two) shapes, fp32, every kernel fwd+bwd against the reference."""
    gen = torch.Generator().manual_seed(100 + draw)

    def r(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    x = torch.randn(r(1, 9), r(1, 70), generator=gen)
    _close(*[_grads(impl.squared_relu, [x])[1][0] for impl in (triton_activation, reference)], torch.float32)
    w = torch.randn(x.shape[-1], generator=gen)
    _close_all(*[_grads(impl.rms_norm, [x, w])[1] for impl in (triton_norm, reference)], torch.float32)

    groups = r(1, 4)
    experts = groups * r(1, 5)
    topk = r(1, min(experts, 4))
    group_topk = r(max(1, -(-topk // (experts // groups))), groups)
    logits = torch.randn(r(1, 40), experts, generator=gen)
    bias = torch.randn(experts, generator=gen) * 0.1
    outs = [_grads(lambda l, i=impl: i.route(l, bias, topk, groups, group_topk, 1.7), [logits])
            for impl in (triton_router, reference)]
    assert torch.equal(outs[0][0][1], outs[1][0][1])
    _close(outs[0][0][0], outs[1][0][0], torch.float32)
    _close(outs[0][1][0], outs[1][1][0], torch.float32)

    tokens, hidden = logits.shape[0], r(1, 300)
    h = torch.randn(tokens, hidden, generator=gen)
    idx = outs[1][0][1]
    weights = torch.rand(tokens, topk, generator=gen)

    def dispatch(impl):
        def fn(x_, w_):
            permuted, order, _ = impl.permute(x_, idx, experts)
            return impl.unpermute(permuted.square(), order, w_, tokens)
        return fn
    (o1,), g1 = _grads(dispatch(triton_dispatch), [h, weights])
    (o2,), g2 = _grads(dispatch(reference), [h, weights])
    _close_all([o1, *g1], [o2, *g2], torch.float32)

    n, vocab = r(1, 30), r(2, 3000)
    hid = torch.randn(n, r(1, 20), generator=gen)
    wv = torch.randn(vocab, hid.shape[1], generator=gen)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    chunk = r(1, n)
    l1 = _grads(lambda a, b: triton_loss.linear_cross_entropy(a, b, labels, -100, chunk), [hid, wv])
    l2 = _grads(lambda a, b: reference.linear_cross_entropy(a, b, labels, -100, chunk), [hid, wv])
    _close_all([l1[0][0], *l1[1]], [l2[0][0], *l2[1]], torch.float32)

    hkv = r(1, 2)
    hq = hkv * r(1, 3)
    sk = r(1, 70)
    sq = r(1, sk)
    d = r(1, 40)
    window = None if draw == 0 else r(1, sk + 2)
    q = torch.randn(1, sq, hq, d, generator=gen)
    k = torch.randn(1, sk, hkv, d, generator=gen)
    v = torch.randn(1, sk, hkv, d, generator=gen)
    sinks = torch.randn(hq, generator=gen)
    a1 = _grads(lambda *t: triton_attention.attention(*t, window), [q, k, v, sinks])
    a2 = _grads(lambda *t: reference.attention(*t, window), [q, k, v, sinks])
    _close_all([a1[0][0], *a1[1]], [a2[0][0], *a2[1]], torch.float32)


@pytest.mark.long
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_shapes(dtype):
    """Model-like sizes: 128 heads-dim attention over 300 positions, 64 experts, vocab 8000."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, 300, 4, 64, generator=gen).to(dtype)
    k = torch.randn(1, 300, 1, 64, generator=gen).to(dtype)
    v = torch.randn(1, 300, 1, 64, generator=gen).to(dtype)
    sinks = torch.randn(4, generator=gen)
    a1 = _grads(lambda *t: triton_attention.attention(*t, 128), [q, k, v, sinks])
    a2 = _grads(lambda *t: reference.attention(*t, 128), [q, k, v, sinks])
    _close_all([a1[0][0], *a1[1]], [a2[0][0], *a2[1]], dtype)
    logits = torch.randn(256, 64, generator=gen)
    w1 = K["triton_router"].route(logits, None, 4, 8, 4, 2.5)
    w2 = reference.route(logits, None, 4, 8, 4, 2.5)
    assert torch.equal(w1[1], w2[1])
    hid = torch.randn(200, 64, generator=gen).to(dtype)
    wv = torch.randn(8000, 64, generator=gen).to(dtype)
    labels = torch.randint(0, 8000, (200,), generator=gen)
    l1 = _grads(lambda a, b: triton_loss.linear_cross_entropy(a, b, labels, -100, 64), [hid, wv])
    l2 = _grads(lambda a, b: reference.linear_cross_entropy(a, b, labels, -100, 64), [hid, wv])
    _close_all([l1[0][0], *l1[1]], [l2[0][0], *l2[1]], dtype)


def test_linear_cross_entropy_bf16_hidden_fp32_weight():
    """The bf16 training case: bf16 activations, fp32 master weight (bf16 GEMMs, fp32 softmax);
    the weight gradient comes back fp32, the hidden gradient bf16."""
    gen = torch.Generator().manual_seed(13)
    h = torch.randn(13, 16, generator=gen).to(torch.bfloat16)
    w = torch.randn(2500, 16, generator=gen) * 0.5
    labels = torch.randint(0, 2500, (13,), generator=gen)
    labels[::4] = -100
    (loss,), grads = _grads(lambda a, b: triton_loss.linear_cross_entropy(a, b, labels, -100, 5), [h, w])
    (lossr,), ref = _grads(lambda a, b: reference.linear_cross_entropy(a, b, labels, -100, 5), [h, w])
    assert loss.dtype == torch.float32 and grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    _close_all([loss, *grads], [lossr, *ref], torch.bfloat16)


def test_linear_cross_entropy_ignores_autocast():
    """Under autocast the GEMMs follow the inputs' dtype (fp32 here), not autocast's, in forward
    and backward (consistent lse)."""
    gen = torch.Generator().manual_seed(11)
    h = torch.randn(9, 16, generator=gen)
    w = torch.randn(500, 16, generator=gen) * 0.5
    labels = torch.randint(0, 500, (9,), generator=gen)
    device_type = "cuda" if DEVICE == "cuda" else "cpu"

    def under_autocast(a, b):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return triton_loss.linear_cross_entropy(a, b, labels, -100, 4)
    (loss,), grads = _grads(under_autocast, [h, w])
    (lossr,), ref = _grads(lambda a, b: reference.linear_cross_entropy(a, b, labels, -100, 4), [h, w])
    _close_all([loss, *grads], [lossr, *ref], torch.float32)


def test_route_rejects_impossible_selection():
    logits = torch.randn(3, 8)
    with pytest.raises(ValueError, match="top-5 of 8 experts in the best 2 of 4 groups"):
        triton_router.route(logits, None, 5, 4, 2)
    with pytest.raises(ValueError, match="do not split"):
        triton_router.route(logits, None, 2, 3, 1)


def test_model_forward_backward_through_triton_kernels(monkeypatch):
    """A tiny VPMoE (window + full layers, sinks, GQA, grouped routing, shared expert) trained one
    step through every kernel matches the same model on the references: loss and all gradients."""
    if DEVICE != "cpu":
        pytest.skip("forces the Triton branch for CPU tensors (interpreter only)")
    from megatron_vpmoe.config.schema import ModelConfig
    from megatron_vpmoe.model import VpmoeModel

    cfg = ModelConfig(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4,
                      num_query_groups=2, kv_channels=8, ffn_hidden_size=48, window_size=3,
                      num_moe_experts=6, moe_router_topk=2, moe_ffn_hidden_size=16,
                      moe_shared_expert_intermediate_size=16, moe_router_num_groups=3,
                      moe_router_group_topk=2, moe_first_k_dense=0)
    gen = torch.Generator().manual_seed(12)
    ids = torch.randint(0, 97, (2, 11), generator=gen)
    labels = torch.randint(0, 97, (2, 11), generator=gen)
    labels[0, :3] = -100

    def run():
        torch.manual_seed(0)
        model = VpmoeModel(cfg)
        loss = model(ids, labels=labels)
        (loss.sum() / (labels != -100).sum() + model.aux_loss()).backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = run()
    monkeypatch.setattr(ops, "_use_triton", lambda t: True)
    loss, grads = run()
    _close(loss, ref_loss, torch.float32)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)
