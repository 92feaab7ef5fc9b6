"""TPA, GRAPE-M and ALiBi (issue 24): explicit constructions, RoPE as a special case, relative law, KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vpmoe.kernels import reference
from megatron_vpmoe.config.schema import ModelConfig
from megatron_vpmoe.model import VpmoeModel
from megatron_vpmoe.model.generation import generate
from megatron_vpmoe.model.layers import KVCache, local_linear_spec
from megatron_vpmoe.model.params import count_parameters
from megatron_vpmoe.model.positions import GrapeM, alibi_slopes, apply_rope
from megatron_vpmoe.model.tpa import TensorProductAttention

LOCKED = dict(local_attention="tpa", local_position="grape_m", global_position="alibi")


def tiny_cfg(**over) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=32, num_layers=4, num_attention_heads=4, num_query_groups=2,
                kv_channels=8, ffn_hidden_size=64, window_size=3, local_global_pattern=[1, 1],
                num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
                moe_shared_expert_intermediate_size=16, moe_router_num_groups=2,
                moe_router_group_topk=2, init_method_std=0.1, tpa_q_rank=3, tpa_kv_rank=2)
    base.update(over)
    return ModelConfig(**base)


def naive_attention(q, k, v, sinks, window, scale, bias=None):
    """Per-head, per-query loops: ``q, k, v [S, H, D]`` (one sequence)."""
    s, heads, _ = q.shape
    out = torch.zeros_like(q)
    for h in range(heads):
        for i in range(s):
            keys = [j for j in range(i + 1) if window is None or j > i - window]
            logits = torch.stack([q[i, h] @ k[j, h] * scale + (0.0 if bias is None else bias[h, i, j])
                                  for j in keys])
            denom = logits.exp().sum() + (sinks[h].exp() if sinks is not None else 0.0)
            out[i, h] = sum(logits[n].exp() / denom * v[j, h] for n, j in enumerate(keys))
    return out


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("position", ["none", "rope"])
def test_tpa_equals_explicit_per_head_construction(position):
    cfg = tiny_cfg(position_embedding_type="rope" if position == "rope" else "none",
                   local_attention="tpa", add_bias_linear=True)
    torch.manual_seed(0)
    layers = [TensorProductAttention(cfg, i, local_linear_spec()) for i in (0, 2)]  # 0 and 2 are local
    for layer in layers:
        for p in layer.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(1, 7, cfg.hidden_size)
    positions = torch.arange(3, 10).unsqueeze(0)  # not starting at 0
    out0, raw0 = layers[0](x, positions, None)
    out2, _ = layers[1](x, positions, raw0)

    heads, d, rq, rk = cfg.num_attention_heads, cfg.kv_channels, cfg.tpa_q_rank, cfg.tpa_kv_rank
    ranks = rq + 2 * rk

    def explicit(layer, v_first):
        wa = layer.linear_a.weight.view(heads, ranks, -1)
        ba = layer.linear_a.bias.view(heads, ranks)
        wb = layer.linear_b.weight.view(ranks, d, -1)
        bb = layer.linear_b.bias.view(ranks, d)
        q, k, v = (torch.zeros(7, heads, d) for _ in range(3))
        for t in range(7):
            for h in range(heads):
                for r in range(ranks):
                    a = wa[h, r] @ x[0, t] + ba[h, r]
                    b = wb[r] @ x[0, t] + bb[r]
                    if r < rq:
                        q[t, h] += a * rms(b, layer.q_norm.weight, cfg.norm_epsilon) / rq
                    elif r < rq + rk:
                        k[t, h] += a * rms(b, layer.k_norm.weight, cfg.norm_epsilon) / rk
                    else:
                        v[t, h] += a * b / rk
        if position == "rope":  # rotating the expanded heads = rotating the dim factors
            q = apply_rope(q.unsqueeze(0), positions, cfg.rotary_base)[0]
            k = apply_rope(k.unsqueeze(0), positions, cfg.rotary_base)[0]
        if v_first is not None:
            lam = layer.value_lambda
            v = lam * v + (1 - lam) * v_first
        o = naive_attention(q, k, v, layer.sinks, cfg.window_size, 1 / math.sqrt(d))
        return layer.linear_proj(o.reshape(7, heads * d)), v

    with torch.no_grad():
        ref0, v0 = explicit(layers[0], None)
        ref2, _ = explicit(layers[1], v0)
    torch.testing.assert_close(out0[0], ref0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out2[0], ref2, atol=1e-6, rtol=1e-6)


def test_grape_m_with_canonical_planes_and_rope_spectrum_is_rope():
    x = torch.randn(2, 9, 3, 16)
    positions = torch.randint(0, 5000, (2, 9))
    rope = apply_rope(x, positions, 10_000.0)
    for learn_freq in (False, True):
        for learn_basis in (False, True):
            grape = GrapeM(16, 10_000.0, learn_freq, learn_basis)
            assert torch.equal(grape(x, positions), rope)
    # whole models: local_position grape_m (untrained) gives RoPE's logits bit for bit
    ids = torch.randint(0, 97, (2, 8))
    torch.manual_seed(4)
    a = VpmoeModel(tiny_cfg(local_attention="tpa"))
    torch.manual_seed(4)
    b = VpmoeModel(tiny_cfg(local_attention="tpa", local_position="grape_m", grape_m_learnable_basis=True))
    missing = b.load_state_dict(a.state_dict(), strict=False).missing_keys
    assert missing and all(".grape." in k for k in missing)
    assert torch.equal(a(ids), b(ids))


def test_grape_m_is_the_matrix_exponential_of_its_generator_and_relative():
    torch.manual_seed(0)
    d = 8
    grape = GrapeM(d, 100.0, True, True)
    with torch.no_grad():
        grape.freq_log_scale.normal_(0.0, 0.5)
        grape.basis_skew.normal_(0.0, 0.5)
    p, w = grape.basis(), grape.frequencies()
    assert torch.allclose(p @ p.t(), torch.eye(d), atol=1e-5)
    generator = torch.zeros(d, d)  # sum_j w_j L_j, L_j the rank-2 skew generator of plane j
    for j in range(d // 2):
        u, v = p[:, j], p[:, j + d // 2]
        generator += w[j] * (torch.outer(v, u) - torch.outer(u, v))
    x = torch.randn(1, 1, 1, d)
    for n in (0, 1, 5, 40):
        rotated = grape(x, torch.tensor([[n]]))[0, 0, 0]
        explicit = torch.linalg.matrix_exp(n * generator) @ x[0, 0, 0]
        torch.testing.assert_close(rotated, p.t() @ explicit, atol=1e-5, rtol=1e-5)  # R(nw) P^T x = P^T G(n) x
    # relative law: shifting every position by k leaves every query-key score unchanged
    q, k = torch.randn(1, 12, 2, d), torch.randn(1, 12, 2, d)
    pos = torch.arange(12).unsqueeze(0)

    def scores(offset):
        qr, kr = grape(q, pos + offset), grape(k, pos + offset)
        return torch.einsum("bshd,bthd->bhst", qr, kr)

    for offset in (7, 300):
        torch.testing.assert_close(scores(offset), scores(0), atol=1e-4, rtol=1e-4)


def test_alibi_slopes_and_bias_equal_the_closed_form():
    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]
    assert alibi_slopes(4) == [2.0 ** -(2 * (i + 1)) for i in range(4)]
    # 6 heads: the 4-head slopes, then the odd-indexed... every other slope of the 8-head set
    assert alibi_slopes(6) == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 4, 8), torch.randn(1, 6, 4, 8), torch.randn(1, 6, 4, 8)
    slopes = torch.tensor(alibi_slopes(4))
    sinks = torch.randn(4)
    bias = torch.tensor([[[-float(slopes[h]) * (i - j) for j in range(6)] for i in range(6)] for h in range(4)])
    out = reference.attention(q, k, v, sinks, None, 0.3, alibi=slopes)
    torch.testing.assert_close(out[0], naive_attention(q[0], k[0], v[0], sinks, None, 0.3, bias), atol=1e-6, rtol=1e-6)
    # streaming: the last 2 queries against all 6 keys give the full run's last 2 rows
    tail = reference.attention(q[:, 4:], k, v, sinks, None, 0.3, alibi=slopes)
    torch.testing.assert_close(tail, out[:, 4:], atol=1e-6, rtol=1e-6)


VARIANTS = {
    "tpa": dict(local_attention="tpa"),
    "tpa_grape": dict(local_attention="tpa", local_position="grape_m"),
    "gqa_grape_basis": dict(local_position="grape_m", grape_m_learnable_basis=True),
    "alibi": dict(global_position="alibi"),
    "global_none": dict(global_position="none"),
    "locked": LOCKED,
    "locked_no_value_residual": dict(LOCKED, value_residual=False, softmax_offset=False),
}


@pytest.mark.parametrize("over", VARIANTS.values(), ids=VARIANTS.keys())
def test_kv_cache_generation_equals_full_forward(over):
    cfg = tiny_cfg(**over)
    torch.manual_seed(1)
    model = VpmoeModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg).total
    with torch.no_grad():  # away from the init, so GRAPE-M is not RoPE
        for name, p in model.named_parameters():
            if "grape" in name:
                p.normal_(0.0, 0.3)
    prompts = [[1, 2, 3, 4], [9, 10]]
    new = generate(model, prompts, max_new_tokens=7)  # 11 positions >> window 3
    with torch.no_grad():
        for prompt, out in zip(prompts, new):
            seq = list(prompt)
            for _ in range(7):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            assert seq[len(prompt):] == out
        # incremental logits equal the full forward's at every step
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
        full = model(ids)
        cache = KVCache(cfg.num_layers)
        steps = [model(ids[:, :3], cache=cache)]
        for t in range(3, 8):
            steps.append(model(ids[:, t:t + 1], position_ids=torch.tensor([[t]]), cache=cache))
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_tpa_cache_holds_window_of_factors():
    cfg = tiny_cfg(**LOCKED)
    model = VpmoeModel(cfg)
    cache = KVCache(cfg.num_layers)
    with torch.no_grad():
        model(torch.tensor([list(range(10))]), cache=cache)
    h, d, r = cfg.num_attention_heads, cfg.kv_channels, cfg.tpa_kv_rank
    w = cfg.window_size - 1
    assert [tuple(t.shape) for t in cache.entries[0]] == [(1, w, h, r), (1, w, r, d), (1, w, h, r), (1, w, r, d)]
    # layer 2 mixes layer 0's values: its value factors have twice the rank
    assert [tuple(t.shape) for t in cache.entries[2]] == [(1, w, h, r), (1, w, r, d), (1, w, h, 2 * r),
                                                       (1, w, 2 * r, d)]
    assert cache.entries[1][0].shape[1] == 10  # global layers keep everything


@pytest.mark.parametrize("over,key", [
    (dict(nope_on_global=True, global_position="alibi"), "model.nope_on_global"),
    (dict(position_embedding_type="none", local_position="grape_m"), "model.position_embedding_type"),
    (dict(local_attention="tpa", tpa_q_rank=0), "model.tpa_q_rank"),
])
def test_bad_attention_options_name_the_key(over, key):
    from megatron_vpmoe.utils.errors import ConfigError
    with pytest.raises(ConfigError, match=key):
        tiny_cfg(**over).validate()


def test_locked_bf16_forward_backward_and_cached_decoding():
    """Under bf16 autocast the locked attention trains and its cached decoding follows the full forward."""
    cfg = tiny_cfg(**LOCKED)
    torch.manual_seed(2)
    model = VpmoeModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).mean()
        loss.backward()
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():
            if "self_attention" in name:  # every attention parameter gets a finite gradient
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
        with torch.no_grad():
            full = model(ids)
            cache = KVCache(cfg.num_layers)
            steps = [model(ids[:, :4], cache=cache)]
            for t in range(4, 9):
                steps.append(model(ids[:, t:t + 1], position_ids=torch.full((2, 1), t), cache=cache))
    assert (torch.cat(steps, 1) - full).abs().max() < 5e-2
