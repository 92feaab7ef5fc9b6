"""kernels.reference against naive PyTorch (loops, brute force, full logits), the CPU dispatch,
and the chunked loss's peak-memory acceptance (each variant in a fresh subprocess)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.kernels import available_memory, measure_loss_peak
from megatron_vpmoe.kernels import ops, reference


def test_rms_norm_matches_naive():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 19, generator=gen, dtype=torch.float64)
    w = torch.randn(19, generator=gen, dtype=torch.float64)
    naive = torch.stack([torch.stack([row / math.sqrt(float((row * row).mean()) + 1e-6) * w for row in b])
                         for b in x])
    torch.testing.assert_close(reference.rms_norm(x.float(), w.float(), 1e-6).double(), naive,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference.rms_norm(x.float(), w.float(), 1e-6),
                               F.rms_norm(x.float(), (19,), w.float(), 1e-6), rtol=1e-5, atol=1e-5)
    xb = x.to(torch.bfloat16)
    assert reference.rms_norm(xb, w.float()).dtype == torch.bfloat16


def test_squared_relu_matches_naive():
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = reference.squared_relu(x)
    torch.testing.assert_close(y, torch.where(x > 0, x * x, torch.zeros_like(x)))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.where(x > 0, 2 * x, torch.zeros_like(x)))


def _brute_force_route(scores, bias, topk, groups, group_topk):
    """Per token: try every combination of ``group_topk`` groups, keep the best by the sum of
    their top-2 sums, then sort the experts of those groups."""
    experts = scores.shape[1]
    per_group = experts // groups
    selected = []
    for row, sel in zip(scores.tolist(), (scores + bias).tolist()):
        group_score = [sum(sorted(sel[g * per_group:(g + 1) * per_group], reverse=True)[:2])
                       for g in range(groups)]
        best = max(itertools.combinations(range(groups), group_topk),
                   key=lambda combo: sum(group_score[g] for g in combo))
        candidates = [e for g in best for e in range(g * per_group, (g + 1) * per_group)]
        selected.append(sorted(candidates, key=lambda e: -sel[e])[:topk])
    return torch.tensor(selected, dtype=torch.int64)


@pytest.mark.parametrize("case", [(30, 16, 4, 4, 2), (20, 9, 3, 3, 1), (10, 6, 2, 1, 1),
                                  (12, 8, 5, 8, 5)])
def test_route_matches_brute_force(case):
    tokens, experts, topk, groups, group_topk = case
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(tokens, experts, generator=gen, requires_grad=True)
    bias = torch.randn(experts, generator=gen) * 0.3
    weights, indices, scores = reference.route(logits, bias, topk, groups, group_topk, 2.0)
    expected = _brute_force_route(torch.sigmoid(logits.detach()), bias, topk, groups, group_topk)
    assert torch.equal(indices, expected)
    chosen = torch.sigmoid(logits.detach()).gather(1, expected)
    torch.testing.assert_close(weights.detach(), 2.0 * chosen / chosen.sum(-1, keepdim=True))
    torch.testing.assert_close(scores.detach(), torch.sigmoid(logits.detach()))
    weights.sum().backward()  # differentiable w.r.t. the logits through the chosen scores
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_route_softmax_and_bias_only_steers_selection():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(8, 6, generator=gen)
    bias = torch.zeros(6)
    bias[5] = 10.0  # expert 5 always chosen, but its weight is its unbiased score
    w, i, s = reference.route(logits, bias, 1, score_function="softmax")
    assert (i[:, 0] == 5).all()
    torch.testing.assert_close(w[:, 0], torch.softmax(logits, -1)[:, 5])
    with pytest.raises(ValueError, match="score function"):
        reference.route(logits, None, 1, score_function="tanh")


def test_permute_unpermute_match_per_token_loop():
    gen = torch.Generator().manual_seed(4)
    tokens, hidden, experts, topk = 11, 7, 6, 2
    h = torch.randn(tokens, hidden, generator=gen)
    indices = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)]) % 4
    weights = torch.rand(tokens, topk, generator=gen)
    permuted, order, counts = reference.permute(h, indices, experts)
    rows = [(e, t, k) for e in range(experts) for t in range(tokens) for k in range(topk)
            if indices[t, k] == e]
    torch.testing.assert_close(permuted, torch.stack([h[t] for _, t, _ in rows]))
    assert counts.tolist() == [sum(1 for e_, _, _ in rows if e_ == e) for e in range(experts)]
    assert counts[4:].sum() == 0  # experts 4 and 5 are empty
    y = permuted * 3.0
    out = reference.unpermute(y, order, weights, tokens)
    naive = torch.zeros(tokens, hidden)
    for i, (_, t, k) in enumerate(rows):
        naive[t] += weights[t, k] * y[i]
    torch.testing.assert_close(out, naive)


@pytest.mark.parametrize("window,sink", [(None, False), (None, True), (5, True), (1, False)])
def test_attention_matches_per_query_loop(window, sink):
    gen = torch.Generator().manual_seed(5)
    b, sq, sk, hq, hkv, d = 2, 7, 12, 4, 2, 8
    q = torch.randn(b, sq, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, sk, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, sk, hkv, d, generator=gen, dtype=torch.float64)
    sinks = torch.randn(hq, generator=gen, dtype=torch.float64) if sink else None
    out = reference.attention(q.float(), k.float(), v.float(), sinks.float() if sink else None, window)
    naive = torch.zeros(b, sq, hq, d, dtype=torch.float64)
    for bi, qi, h in itertools.product(range(b), range(sq), range(hq)):
        pos = sk - sq + qi
        keys = [j for j in range(sk) if j <= pos and (window is None or j > pos - window)]
        logits = [float(q[bi, qi, h] @ k[bi, j, h // (hq // hkv)]) / math.sqrt(d) for j in keys]
        denom = sum(math.exp(x) for x in logits) + (math.exp(float(sinks[h])) if sink else 0.0)
        for j, x in zip(keys, logits):
            naive[bi, qi, h] += math.exp(x) / denom * v[bi, j, h // (hq // hkv)]
    torch.testing.assert_close(out.double(), naive, rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_matches_full_logits():
    gen = torch.Generator().manual_seed(6)
    n, hidden, vocab = 37, 16, 301
    h = torch.randn(n, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::4] = -100
    g = torch.rand(n, generator=gen)
    loss = reference.linear_cross_entropy(h, w, labels, chunk_size=10)
    loss.backward(g)
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    naive = F.cross_entropy(h @ w.t(), labels, reduction="none", ignore_index=-100)
    naive.backward(g)
    torch.testing.assert_close(loss, naive.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-5)


def test_ops_use_reference_on_cpu(monkeypatch):
    x = torch.randn(3, 8)
    assert not ops._use_triton(x)
    assert torch.equal(ops.rms_norm(x, torch.ones(8)), reference.rms_norm(x, torch.ones(8)))
    assert torch.equal(ops.squared_relu(x), reference.squared_relu(x))
    monkeypatch.setenv("VPMOE_DISABLE_TRITON", "1")
    assert not ops.triton_available()


def _check_peak_ratio(tmp_path, n, vocab, hidden, chunk):
    naive = measure_loss_peak("naive", n, vocab, hidden, chunk, tmp_path / "naive.pt")
    chunked = measure_loss_peak("chunked", n, vocab, hidden, chunk, tmp_path / "chunked.pt")
    a, b = torch.load(tmp_path / "naive.pt"), torch.load(tmp_path / "chunked.pt")
    for key in ("loss", "gh", "gw"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    assert naive >= 4 * chunked, (naive, chunked)
    return naive, chunked


def test_chunked_loss_peak_memory_reduced(tmp_path):
    """Reduced default: 2,048 tokens x vocab 32,000 (the full size is the long test)."""
    _check_peak_ratio(tmp_path, 2048, 32000, 64, 256)


@pytest.mark.long
def test_chunked_loss_peak_memory_full(tmp_path):
    """Acceptance size: 8,192 tokens x vocab 201,088, hidden 64. The naive run needs ~20 GiB."""
    need = 4 * 8192 * 201088 * 4 + (2 << 30)
    if available_memory() < need:
        pytest.skip(f"naive logits + cross_entropy needs ~{need / 2**30:.0f} GiB free; "
                    f"{available_memory() / 2**30:.1f} GiB available")
    _check_peak_ratio(tmp_path, 8192, 201088, 64, 1024)


@pytest.mark.long
def test_chunked_loss_peak_memory_acceptance_bound(tmp_path):
    """8,192 tokens x vocab 201,088 without running the ~19 GiB naive variant: the naive peak only
    grows with the token count, so naive(2,048 tokens) / chunked(8,192 tokens) is a lower bound
    of the ratio at 8,192. Loss and gradients are compared at 2,048 tokens."""
    naive_2048, chunked_2048 = _check_peak_ratio(tmp_path, 2048, 201088, 64, 1024)
    chunked_8192 = measure_loss_peak("chunked", 8192, 201088, 64, 1024)
    assert chunked_8192 < 1.2 * chunked_2048  # flat in the token count
    assert naive_2048 >= 4 * chunked_8192, (naive_2048, chunked_8192)


def test_linear_cross_entropy_fp32_under_autocast():
    """Forward and backward both use fp32 logits under autocast, so the gradient is the loss's."""
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(9, 16, generator=gen, requires_grad=True)
    w = (torch.randn(500, 16, generator=gen) * 0.5).requires_grad_()
    labels = torch.randint(0, 500, (9,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = reference.linear_cross_entropy(h, w, labels, chunk_size=4)
    loss.sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    naive = F.cross_entropy(h @ w.t(), labels, reduction="none")
    naive.sum().backward()
    torch.testing.assert_close(loss, naive.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-5)
