"""Single-process VPMoE model: parameter accounting, component references, generation, balancing."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from megatron_vpmoe.kernels import ops
from megatron_vpmoe.model import VpmoeModel
from megatron_vpmoe.model.generation import generate
from megatron_vpmoe.model.moe import GroupedExperts, Router, _padded_bmm, grouped_matmul
from megatron_vpmoe.model.params import count_parameters
from helpers.model_configs import tiny_model_cfg as tiny_cfg


@pytest.mark.parametrize("over", [
    {},
    {"add_bias_linear": True, "normalization": "LayerNorm"},
    {"activation": "swiglu", "moe_num_shared_experts": 2},
    {"untie_embeddings_and_output_weights": False, "qk_layernorm": False, "softmax_offset": False,
     "value_residual": False},
    {"num_moe_experts": 0},
    {"moe_shared_expert_intermediate_size": 0, "moe_first_k_dense": 0},
])
def test_parameter_count_matches_accounting(over):
    cfg = tiny_cfg(**over)
    model = VpmoeModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total
    out = model(torch.randint(0, cfg.vocab_size, (2, 5)))
    assert out.shape == (2, 5, cfg.vocab_size) and out.dtype == torch.float32


def test_tiny_cpu_example_counts(repo_root):
    from megatron_vpmoe.config.loader import load_config  # noqa: WPS433
    cfg = load_config(str(repo_root / "examples/configs/tiny-cpu.yaml")).model
    model = VpmoeModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total


def test_deterministic_init_and_loss_vs_logits():
    cfg = tiny_cfg()
    torch.manual_seed(3)
    a = VpmoeModel(cfg)
    torch.manual_seed(3)
    b = VpmoeModel(cfg)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    labels = torch.randint(0, cfg.vocab_size, (2, 7))
    labels[0, :2] = -100
    loss = a(ids, labels=labels)
    logits = a(ids)
    ref = F.cross_entropy(logits.view(-1, cfg.vocab_size), labels.view(-1), reduction="none",
                          ignore_index=-100).view(2, 7)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert torch.all(loss[0, :2] == 0)


def naive_attention(q, k, v, sinks, window):
    """Per query, per head loop: softmax over visible keys plus the sink logit."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            g = h // (hq // hkv)
            for i in range(sq):
                pos = sk - sq + i
                keys = [j for j in range(sk) if j <= pos and (window is None or j > pos - window)]
                logits = torch.stack([q[bi, i, h] @ k[bi, j, g] / math.sqrt(d) for j in keys])
                allz = torch.cat([logits, sinks[h:h + 1]]) if sinks is not None else logits
                p = torch.softmax(allz, 0)[: len(keys)]
                out[bi, i, h] = sum(p[n] * v[bi, j, g] for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("window,sq", [(None, 6), (3, 6), (2, 2)])
def test_attention_matches_naive(window, sq):
    torch.manual_seed(0)
    q = torch.randn(2, sq, 4, 8)
    k, v = torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    sinks = torch.randn(4)
    got = ops.attention(q, k, v, sinks=sinks, window=window)
    torch.testing.assert_close(got, naive_attention(q, k, v, sinks, window), rtol=1e-5, atol=1e-5)


def test_group_limited_topk_matches_brute_force():
    torch.manual_seed(0)
    e, groups, group_topk, topk = 8, 4, 2, 3
    logits = torch.randn(50, e)
    bias = torch.randn(e) * 0.1
    weights, idx, scores = ops.route(logits, bias, topk, groups, group_topk, 2.5)
    from itertools import combinations
    sel = torch.sigmoid(logits) + bias
    for t in range(50):
        gscore = [sorted(sel[t, g * 2:(g + 1) * 2].tolist())[-2:] for g in range(groups)]
        gscore = [sum(x) for x in gscore]
        best_groups = sorted(range(groups), key=lambda g: -gscore[g])[:group_topk]
        allowed = [x for g in best_groups for x in range(g * 2, g * 2 + 2)]
        best = max(combinations(allowed, topk), key=lambda c: sum(sel[t, i].item() for i in c))
        assert sorted(best) == sorted(idx[t].tolist())
        w = torch.sigmoid(logits[t, list(idx[t])])
        torch.testing.assert_close(weights[t], 2.5 * w / w.sum())


def test_dropless_dispatch_matches_per_token_loop():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = VpmoeModel(cfg)
    moe = model.moe_layers()[0]
    x = torch.randn(2, 5, cfg.hidden_size)
    tokens = x.view(-1, cfg.hidden_size)
    weights, idx, _ = ops.route(F.linear(tokens, moe.router.weight), moe.router.expert_bias,
                                cfg.moe_router_topk, cfg.moe_router_num_groups,
                                cfg.moe_router_group_topk, cfg.moe_router_topk_scaling_factor)
    ex = moe.experts
    ref = torch.zeros_like(tokens)
    for t in range(tokens.shape[0]):
        for j in range(cfg.moe_router_topk):
            e = idx[t, j]
            y = ops.squared_relu(tokens[t] @ ex.fc1_weight[e]) @ ex.fc2_weight[e]
            ref[t] += weights[t, j] * y
    for shared in moe.shared_experts:
        ref += shared(tokens)
    torch.testing.assert_close(moe(x).view(-1, cfg.hidden_size), ref, rtol=1e-5, atol=1e-5)


def test_grouped_matmul_forms_agree_with_loop():
    torch.manual_seed(0)
    cfg = tiny_cfg(add_bias_linear=True)
    ex = GroupedExperts(cfg, 4)
    torch.nn.init.normal_(ex.fc1_weight)
    torch.nn.init.normal_(ex.fc2_weight)
    torch.nn.init.normal_(ex.fc1_bias)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, cfg.hidden_size, requires_grad=True)
    torch.testing.assert_close(ex(x, counts), ex.forward_loop(x, counts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_padded_bmm(x, ex.fc1_weight, counts),
                               grouped_matmul(x, ex.fc1_weight, counts), rtol=1e-5, atol=1e-5)
    odd = torch.randn(10, 5)  # 20-byte rows: not grouped_mm-aligned, takes the batched form
    w = torch.randn(4, 5, 3)
    torch.testing.assert_close(grouped_matmul(odd, w, counts),
                               torch.cat([odd[:3] @ w[0], odd[3:8] @ w[2], odd[8:] @ w[3]]))
    ex(x, counts).sum().backward()  # the grouped GEMM backward accepts expanded gradients
    assert x.grad is not None and ex.fc1_weight.grad is not None


def test_value_residual_mixes_layer0_values():
    cfg = tiny_cfg(num_moe_experts=0)
    torch.manual_seed(0)
    model = VpmoeModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    captured = {}
    attn1 = model.layers["1"].self_attention
    original = ops.attention

    def spy(q, k, v, **kw):
        captured.setdefault("v", []).append(v)
        return original(q, k, v, **kw)

    vals = {}
    for i in (0, 1):
        model.layers[str(i)].self_attention.register_forward_hook(
            lambda mod, inp, out, i=i: vals.__setitem__(i, out[1]))
    import megatron_vpmoe.model.layers as layers_mod
    layers_mod.ops.attention = spy
    try:
        with torch.no_grad():
            attn1.value_lambda.fill_(0.25)
            model(ids)
    finally:
        layers_mod.ops.attention = original
    expected = 0.25 * vals[1] + 0.75 * vals[0]
    torch.testing.assert_close(captured["v"][1], expected)
    torch.testing.assert_close(captured["v"][0], vals[0])  # layer 0 is not mixed
    # lambda gets a gradient
    model(ids, labels=ids).sum().backward()
    assert attn1.value_lambda.grad is not None and attn1.value_lambda.grad.abs() > 0


def test_kv_cache_generation_equals_full_forward():
    cfg = tiny_cfg(window_size=3)
    torch.manual_seed(1)
    model = VpmoeModel(cfg)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    new = generate(model, prompts, max_new_tokens=8)  # 12 positions >> window 3
    for prompt, out in zip(prompts, new):
        assert len(out) == 8
        seq = list(prompt)
        for _ in range(8):  # greedy decoding by full-sequence forwards
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert seq[len(prompt):] == out
    # the cache of a sliding-window layer holds at most window-1 entries
    from megatron_vpmoe.model.layers import KVCache
    cache = KVCache(cfg.num_layers)
    model(torch.tensor([list(range(10))]), cache=cache)
    assert cache.keys[0].shape[1] == cfg.window_size - 1 and cache.keys[1].shape[1] == 10


def test_sampling_eos_and_logprobs():
    cfg = tiny_cfg()
    torch.manual_seed(1)
    model = VpmoeModel(cfg)
    g = torch.Generator().manual_seed(0)
    a = generate(model, [[1, 2, 3]] * 3, 6, temperature=1.0, top_p=0.9, generator=g)
    g = torch.Generator().manual_seed(0)
    b = generate(model, [[1, 2, 3]] * 3, 6, temperature=1.0, top_p=0.9, generator=g)
    assert a == b
    greedy = generate(model, [[1, 2, 3]], 6)[0]
    stopped = generate(model, [[1, 2, 3]], 6, eos_id=greedy[2])[0]
    assert stopped == greedy[: greedy.index(greedy[2]) + 1]
    # teacher-forced log-probs through the inference backend (right-padded batch) equal the loss
    from megatron_vpmoe.inference.native import NativeBackend

    backend = NativeBackend(model=model, max_length=16)
    seqs, starts = [[1, 2, 3, 4, 5], [7, 8, 9], [4]], [2, 1, 1]
    lp = [lp for lp, _ in backend.score(seqs, starts)]
    loss = model(torch.tensor([seqs[0][:-1]]), labels=torch.tensor([seqs[0][1:]]))
    torch.testing.assert_close(lp[0], -loss[0, 1:], rtol=1e-5, atol=1e-5)
    assert len(lp[1]) == 2 and len(lp[2]) == 0
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 500]], 2)
    with pytest.raises(ValueError, match="starts"):
        backend.score([[1, 2]], [0])


def test_aux_loss_and_expert_load():
    cfg = tiny_cfg(moe_aux_loss_coeff=0.01)
    model = VpmoeModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    model(ids, labels=ids)
    aux = model.aux_loss()
    assert aux.requires_grad and aux.item() > 0
    load = model.expert_load()
    assert load.shape == (3, 8) and torch.all(load.sum(1) == 2 * 6 * cfg.moe_router_topk)
    metric = model.balance_metric()
    assert metric["max_over_mean"] >= 1.0 and "layer1/max_over_mean" in metric
    model.update_expert_bias()
    assert model.expert_load().sum() == 0
    assert VpmoeModel(tiny_cfg()).aux_loss().item() == 0.0


def test_expert_bias_balances_skewed_load():
    cfg = tiny_cfg(moe_router_bias_update_rate=1e-2)
    torch.manual_seed(0)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.02)
    with torch.no_grad():
        router.weight[:2] += 0.1  # experts 0 and 1 win on this input
    x = torch.randn(256, cfg.hidden_size) + 0.5  # a shared direction favours experts 0, 1
    router(x)
    first = router.tokens_per_expert.clone()
    last = torch.zeros_like(first)
    for step in range(300):
        router.update_expert_bias()
        router(x)
        if step >= 200:  # load over the last 100 steps
            last += router.tokens_per_expert
    ratio = lambda load: float(load.max() / load.mean())  # noqa: E731
    assert ratio(first) > 3.0
    assert ratio(last) < 1.3, (first, last)
    assert float(last.min() / last.mean()) > 0.7


def test_bad_config_is_rejected():
    from megatron_vpmoe.utils.errors import ConfigError
    with pytest.raises(ConfigError, match="attention_dropout"):
        VpmoeModel(tiny_cfg(attention_dropout=0.1))
    with pytest.raises(ConfigError, match="num_query_groups"):
        VpmoeModel(replace(tiny_cfg(), num_query_groups=3))


def test_bf16_forward_backward_and_generation():
    cfg = tiny_cfg()
    model = VpmoeModel(cfg).to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    loss = model(ids, labels=ids)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.layers["1"].mlp.experts.fc1_weight.grad.dtype == torch.bfloat16
    assert len(generate(model, [[1, 2, 3]], 3)[0]) == 3


def _hand_sequence_aux(scores, indices, batch, e, k):
    """sum_i f_i * P_i per sequence, averaged (DeepSeek-V3), written out with loops."""
    t = scores.shape[0]
    s = t // batch
    total = 0.0
    for b in range(batch):
        rows = range(b * s, (b + 1) * s)
        for i in range(e):
            chosen = sum(1 for r in rows if i in indices[r].tolist())
            f = e / (k * s) * chosen
            p = sum(float(scores[r, i] / scores[r].sum()) for r in rows) / s
            total += f * p
    return total / batch


@pytest.mark.parametrize("coeff", [0.01, 0.3])
def test_aux_loss_is_the_coefficient_times_the_sequence_loss(coeff):
    cfg = tiny_cfg(moe_aux_loss_coeff=coeff)
    torch.manual_seed(0)
    model = VpmoeModel(cfg).train()
    routed = []
    hooks = [moe.router.register_forward_hook(lambda mod, inp, out: routed.append(out)) for moe in model.moe_layers()]
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    model(ids)
    for h in hooks:
        h.remove()
    assert len(routed) == len(model.moe_layers()) == 3
    expected = sum(_hand_sequence_aux(scores.detach(), indices, 2, cfg.num_moe_experts, cfg.moe_router_topk)
                   for _w, indices, scores in routed)
    assert expected > 0
    assert float(model.aux_loss()) == pytest.approx(coeff * expected, rel=1e-5)


def test_value_residual_mixes_layer_0_values_at_every_layer():
    """Layers 1.. mix their values with layer 0's (not the previous layer's): a hand-run of the
    layers with layer 0's values equals the model, and one with the previous layer's does not."""
    cfg = tiny_cfg(num_layers=5, num_moe_experts=0, local_global_pattern=[3, 1])
    torch.manual_seed(0)
    model = VpmoeModel(cfg).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.layers.values()):  # distinct mixing weights per layer
            if i:
                layer.self_attention.value_lambda.fill_(0.2 + 0.1 * i)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    positions = model.default_positions(ids)

    def hand(source):
        hidden, first, prev = model.embed(ids), None, None
        for i, layer in enumerate(model.layers.values()):
            hidden, values = layer(hidden, positions, first if source == "first" else prev, None)
            first = values if i == 0 else first
            prev = values
        return model.head(hidden)

    with torch.no_grad():
        out = model(ids)
        assert torch.equal(out, hand("first"))
        assert not torch.allclose(out, hand("previous"), atol=1e-4)


@pytest.mark.parametrize("eps", [10.0, 0.5])
def test_rms_norm_at_a_large_epsilon_matches_the_closed_form(eps):
    """Epsilon inside the root: x / sqrt(mean(x^2) + eps) * w (at eps 10, outside differs a lot)."""
    from megatron_vpmoe.model.hf_template.modeling_vpmoe import VpmoeNorm
    from megatron_vpmoe.model.layers import RMSNorm

    cfg = tiny_cfg(norm_epsilon=eps)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 0.7
    w = torch.rand(16) + 0.5
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
    for norm in (RMSNorm(16, cfg), VpmoeNorm(16, cfg)):
        with torch.no_grad():
            norm.weight.copy_(w)
            assert torch.allclose(norm(x), expected, atol=1e-6, rtol=1e-5), type(norm)
