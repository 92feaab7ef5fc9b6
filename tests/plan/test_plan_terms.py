"""The planner's memory formula term by term, against closed forms written out here for the tiny
config (4 layers: 1 dense + 3 MoE, 8 experts of width 128, untied head, value residual): parameters
per pipeline rank, expert parameters per EP rank, AdamW state with and without ZeRO-2 (dense state
over DP, expert state over expert-DP), gradients, the embedding gradient, the head's loss chunk,
all-to-all and pipeline buffers, the optimizer step, the gradient copy, checkpoint staging, the
bf16 weight copies, micro-batches in flight per schedule (1F1B from micro-batches == stages), the
step-time terms, and the divisor enumeration. Each layout is chosen so a changed group size,
divisor, factor or boundary changes a number."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from helpers.paths import ROOT

TINY = ROOT / "examples" / "configs" / "tiny-cpu.yaml"


def _cfg(*overrides):
    from megatron_vpmoe.config.loader import load_config
    return load_config(TINY, ["data.mock=true", *overrides])


# ---- closed forms for the tiny config (read its sizes, nothing from the planner) ---------------
def _sizes(m):
    return dict(V=m.vocab_size, h=m.hidden_size, d=m.kv_channels, heads=m.num_attention_heads,
                groups=m.num_query_groups, ffn=m.ffn_hidden_size, E=m.num_moe_experts, k=m.moe_router_topk,
                f=m.moe_ffn_hidden_size, fs=m.moe_shared_expert_intermediate_size)


def _layer_params(m, i, ep):
    s = _sizes(m)
    h, d = s["h"], s["d"]
    attn = h * (s["heads"] * d + 2 * s["groups"] * d) + s["heads"] * d * h  # QKV + output projection
    attn += s["heads"] + 2 * d + (1 if i > 0 else 0)  # sinks, q/k norms, value-residual lambda
    if i == 0:  # dense layer: squared-ReLU MLP
        mlp = 2 * h * s["ffn"]
    else:  # router + this rank's routed experts + the shared expert
        mlp = s["E"] * h + s["E"] // ep * 2 * h * s["f"] + 2 * h * s["fs"]
    return attn + 2 * h + mlp  # + the two pre-norms


def _rank_layers(pp, r):
    return [[0, 1, 2, 3]] if pp == 1 else [[0, 1], [2, 3]][r:r + 1]


def _params(m, pp, r, ep):
    s = _sizes(m)
    first, last = r == 0, r == pp - 1
    n = sum(_layer_params(m, i, ep) for i in _rank_layers(pp, r)[0])
    return n + (s["V"] * s["h"] if first else 0) + ((s["h"] + s["V"] * s["h"]) if last else 0)


def _experts(m, pp, r, ep):
    s = _sizes(m)
    return sum(s["E"] // ep * 2 * s["h"] * s["f"] for i in _rank_layers(pp, r)[0] if i > 0)


def _tensors(pp, r):
    # embedding; final norm + untied head; per layer: 2 norms, QKV, proj, 2 q/k norms, sinks (9),
    # MoE layers also lambda, router, fc1, fc2, shared fc1/fc2 (13) - the dense layer's MLP is 2 of the 9
    return (1 if r == 0 else 0) + (2 if r == pp - 1 else 0) + sum(9 if i == 0 else 13 for i in _rank_layers(pp, r)[0])


def test_closed_forms_agree_with_the_model_count():
    """The hand formulas above are the model's (so the tests below pin the planner, not a typo)."""
    from megatron_vpmoe.model.params import count_parameters

    m = _cfg().model
    assert _params(m, 1, 0, 1) == count_parameters(m).total == 3_314_067
    assert _params(m, 2, 0, 1) + _params(m, 2, 1, 1) == 3_314_067
    assert _experts(m, 1, 0, 1) == 3 * 8 * 2 * 128 * 128


# ---- layouts ---------------------------------------------------------------------------------------
def _layout(**kw):
    from megatron_vpmoe.plan.layouts import Layout
    return Layout(**kw)


def test_layout_group_sizes_and_micro_batches():
    lay = _layout(world=16, tp=2, ep=2, pp=2, mb=2)
    assert lay.dp == 4 and lay.expert_dp == 2 and lay.micro_batches(16) == 2
    assert _layout(world=8, ep=4).dp == 8 and _layout(world=8, ep=4).expert_dp == 2
    assert _layout(world=6, pp=3).dp == 2 and _layout(world=6, pp=3).micro_batches(12) == 6


@pytest.mark.parametrize("pp, vpp, m, expected", [
    (1, 1, 1, "none"), (1, 1, 16, "none"),
    (2, 1, 1, "gpipe"), (2, 1, 2, "1f1b"), (2, 1, 3, "1f1b"),  # micro-batches == stages: 1F1B
    (4, 1, 3, "gpipe"), (4, 1, 4, "1f1b"), (4, 1, 5, "1f1b"),
    (2, 2, 1, "gpipe"), (2, 2, 2, "interleaved-1f1b"), (2, 2, 4, "interleaved-1f1b"),
])
def test_schedule_choice_at_the_boundary(pp, vpp, m, expected):
    lay = _layout(world=pp, pp=pp, vpp=vpp, mb=1)  # dp = 1: micro-batches = global batch
    assert lay.micro_batches(m) == m
    assert lay.schedule(m) == expected


@pytest.mark.parametrize("pp, vpp, m, by_rank", [
    (1, 1, 8, [1]),
    (4, 1, 4, [4, 3, 2, 1]),  # 1F1B at m == pp: pp - rank (GPipe would keep all 4 on every rank)
    (4, 1, 3, [3, 3, 3, 3]),  # GPipe: every micro-batch
    (4, 1, 16, [4, 3, 2, 1]),
    (4, 1, 2, [2, 2, 2, 2]),
    (2, 1, 2, [2, 1]),
    (3, 1, 2, [2, 2, 2]),
    (2, 2, 1, [2, 2]),  # GPipe with chunks: m x vpp
    (2, 2, 4, [5, 3]),  # interleaved: (pp - r - 1) x 2 + (vpp - 1) x pp + 1
    (2, 2, 2, [4, 3]),  # capped at m x vpp = 4
    (4, 2, 4, [8, 8, 7, 5]),  # min(m x vpp = 8, 11 | 9 | 7 | 5)
    (2, 4, 2, [8, 7]),
])
def test_in_flight_by_hand(pp, vpp, m, by_rank):
    from megatron_vpmoe.plan.memory import in_flight

    lay = _layout(world=pp, pp=pp, vpp=vpp, mb=1)
    assert [in_flight(lay, m, r) for r in range(pp)] == by_rank


def test_divisors_by_hand():
    from megatron_vpmoe.plan.layouts import divisors

    assert divisors(1) == [1]
    assert divisors(2) == [1, 2]
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(16) == [1, 2, 4, 8, 16]
    assert divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36]  # a square: sqrt(36) once
    assert divisors(49) == [1, 7, 49]
    assert divisors(97) == [1, 97]  # a prime
    assert divisors(2 * 97) == [1, 2, 97, 194]  # a prime factor above sqrt
    assert divisors(1 << 20) == [1 << i for i in range(21)]
    assert divisors(720) == [d for d in range(1, 721) if 720 % d == 0]
    for n in range(1, 200):
        assert divisors(n) == [d for d in range(1, n + 1) if n % d == 0], n
    with pytest.raises(ValueError):
        divisors(0)


def test_check_layout_refuses_each_indivisible_group():
    from megatron_vpmoe.plan.layouts import check_layout
    from megatron_vpmoe.utils.errors import ConfigError

    cfg = _cfg()  # global batch 16, micro-batch 4, 4 layers, 4 heads / 2 groups, 8 experts
    check_layout(cfg, _layout(world=4, tp=2, ep=2, mb=4))  # dp 2 x mb 4 divides 16
    for kw, key in [
        (dict(world=4, tp=0), "layout tp"), (dict(world=4, ep=0), "layout ep"), (dict(world=4, mb=0), "layout mb"),
        (dict(world=6, tp=2, pp=2, mb=1), "layout tp/pp"),  # 6 % (2 x 2)
        (dict(world=4, tp=2, ep=4, mb=2), "layout ep"),  # 4 % (2 x 4), though 4 % (ep x pp) == 0
        (dict(world=8, tp=2, ep=4, pp=2, mb=2), "layout ep"),  # 8 % 16
        (dict(world=8, mb=4), "train.global_batch_size"),  # dp 8 x mb 4 = 32 does not divide 16
        (dict(world=2, pp=2, vpp=2, mb=16), "layout vpp"),  # 1 micro-batch, not a multiple of pp
    ]:
        with pytest.raises(ConfigError) as err:
            check_layout(cfg, _layout(**kw))
        assert key in str(err.value), (kw, str(err.value))
    check_layout(cfg, _layout(world=8, tp=2, ep=2, pp=2, mb=4))  # 8 % 8 == 0, dp 2
    check_layout(cfg, _layout(world=2, pp=2, vpp=2, mb=8))  # 2 micro-batches: a multiple of pp


def test_enumerated_layouts_use_every_divisor():
    """TP over the divisors of the world up to a node, PP over those of world / TP up to the layer
    count, EP over those of world / (TP x PP) dividing the experts."""
    from megatron_vpmoe.plan.layouts import enumerate_layouts

    cfg = _cfg()
    seen = {(lay.tp, lay.pp, lay.ep) for lay, _ in enumerate_layouts(cfg, 12, 4, micro_batches=(1,))}
    expected = {(tp, pp, ep) for tp in (1, 2, 3, 4) for pp in (1, 2, 3, 4) if (12 // tp) % pp == 0
                for ep in (1, 2, 4, 8) if (12 // (tp * pp)) % ep == 0}
    assert seen == expected


# ---- rank memory, term by term ------------------------------------------------------------------
CASES = {
    # name: (overrides, layout kwargs, pp_rank)
    "ep2-dp4": ([], dict(world=4, ep=2, mb=4), 0),
    "ep2-dp4-zero": ([], dict(world=4, ep=2, mb=4, zero=True), 0),
    "ep2-dp4-zero-no-overlap": ([], dict(world=4, ep=2, mb=4, zero=True, overlap=False), 0),
    "ep4-dp8-zero-accumulating": ([], dict(world=8, ep=4, mb=1, zero=True), 0),
    "ep2-no-overlap": ([], dict(world=4, ep=2, mb=4, overlap=False), 0),
    "ep4-only-experts-reduced-no-overlap": ([], dict(world=4, ep=4, mb=4, overlap=False), 0),
    "pp2-rank0": ([], dict(world=4, pp=2, mb=2), 0),
    "pp2-rank1": ([], dict(world=4, pp=2, mb=2), 1),
    "pp2-vpp2-rank1": (["model.num_layers=4"], dict(world=2, pp=2, vpp=2, mb=4), 1),
    "pp2-ep2-zero-rank1": ([], dict(world=8, pp=2, ep=2, mb=2, zero=True), 1),
    "bf16-ep2": (["train.precision=bf16"], dict(world=4, ep=2, mb=4), 0),
    "single": ([], dict(world=1, mb=4), 0),
    "long-sequence": (["data.seq_length=512"], dict(world=1, mb=4), 0),  # t = 2048 > the loss chunk (1024 rows)
    # more expert than dense parameters on a rank (small vocabulary, 32 experts), DP 2 but expert-DP 1:
    # the gradient copy is the dense one, and the largest tensor a grouped expert weight
    "experts-dominate-edp1-no-overlap": (["model.vocab_size=256", "model.num_moe_experts=32"],
                                         dict(world=2, ep=2, mb=4, overlap=False), 0),
    "experts-dominate-edp2-no-overlap": (["model.vocab_size=256", "model.num_moe_experts=32"],
                                         dict(world=4, ep=2, mb=4, overlap=False), 0),
}


def _expected(cfg, lay, r, framework, foreach):
    """Every component of ``rank_memory`` from the closed forms above."""
    from megatron_vpmoe.parallel.grad_sync import IN_FLIGHT

    m = cfg.model
    s = _sizes(m)
    V, h = s["V"], s["h"]
    a = 2 if cfg.train.precision == "bf16" else 4
    t = lay.mb * cfg.data.seq_length
    pp, ep, dp, edp = lay.pp, lay.ep, lay.dp, lay.expert_dp
    vpp = lay.vpp if pp > 1 else 1
    first, last = r == 0, r == pp - 1
    if vpp == 1:
        P, X, n_t = _params(m, pp, r, ep), _experts(m, pp, r, ep), _tensors(pp, r)
    else:  # pp=2, vpp=2 over 4 layers: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3
        own = [0, 2] if r == 0 else [1, 3]
        P = sum(_layer_params(m, i, ep) for i in own) + (V * h if first else 0) + ((h + V * h) if last else 0)
        X = sum(s["E"] // ep * 2 * h * s["f"] for i in own if i > 0)
        n_t = (1 if first else 0) + (2 if last else 0) + sum(9 if i == 0 else 13 for i in own)
    D = P - X
    micro = cfg.train.global_batch_size // (lay.mb * dp)
    out = {"parameters": 4 * P}
    state = 8 * P if not lay.zero else int(8 * (D / dp + X / edp))
    out["optimizer"] = state + 4 * n_t
    reduced = (D if dp > 1 else 0) + (X if edp > 1 else 0)
    if lay.zero and reduced and micro == 1:
        share = 4 * ((D / dp if dp > 1 else 0) + (X / edp if edp > 1 else 0))
        out["gradients"] = int(4 * (P - reduced) + share)
    else:
        out["gradients"] = 4 * P
    out["embedding_grad"] = 4 * V * h if first else 0
    rows = min(t, 1024)
    out["head_loss"] = (rows * V * (4 + (a if a != 4 else 0)) + 4 * V * h + 2 * t * h * 4) if last else 0
    out["all_to_all"] = 2 * t * s["k"] * h * a if ep > 1 else 0
    kvd = s["groups"] * s["d"] // lay.tp  # layer 0's values travel with the activations
    out["pipeline_buffers"] = 2 * vpp * t * (h + kvd) * a if pp > 1 else 0
    if foreach:
        out["optimizer_step"] = 4 * (P if not lay.zero else int(D / dp + X / edp))
    else:  # one tensor at a time: the largest of embedding / head, QKV, dense fc1, grouped expert fc1
        layers = _rank_layers(pp, r)[0] if vpp == 1 else own
        sizes = [V * h if first or last else 0, (s["heads"] + 2 * s["groups"]) * s["d"] // lay.tp * h,
                 h * s["ffn"] if 0 in layers else 0, s["E"] // ep * h * s["f"] if any(i > 0 for i in layers) else 0]
        out["optimizer_step"] = 4 * max(sizes)
    out["grad_reduce"] = 0 if lay.overlap or lay.zero else 4 * max(D if dp > 1 else 0, X if edp > 1 else 0)
    out["checkpoint_staging"] = 4 * P + out["optimizer"]
    out["autocast_weights"] = (P - X - (V * h if first else 0)) * 2 if a == 2 else 0
    out["framework"] = framework
    # the held gradient bytes at the end of backward (for the moments)
    bucketed = reduced if lay.overlap or lay.zero else 0
    bucket_held = 4 * bucketed
    if lay.zero and reduced and micro == 1:
        full = 4 * reduced if not lay.overlap else min(4 * reduced, (IN_FLIGHT + 1) * int(cfg.parallel.bucket_mb * 2**20))
        bucket_held = int(share + full)
    return out, dict(P=P, X=X, micro=micro, vpp=vpp, bucketed=bucketed, bucket_held=bucket_held)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_rank_memory_terms(name, foreach):
    from megatron_vpmoe.plan.layouts import Layout
    from megatron_vpmoe.plan.memory import in_flight, rank_memory

    overrides, kw, r = CASES[name]
    cfg = _cfg(*overrides)
    lay = Layout(**kw)
    framework = 123_456_789
    got = rank_memory(cfg, lay, r, "reference", framework_bytes=framework, foreach_optimizer=foreach)
    want, extra = _expected(cfg, lay, r, framework, foreach)
    comps = got.components()
    for key, value in want.items():
        assert comps[key] == value, (key, comps[key], value)
    assert got.params == extra["P"]
    assert got.in_flight == in_flight(lay, cfg.train.global_batch_size, r)
    if extra["vpp"] == 1:
        assert got.activations == got.activations_per_microbatch * got.in_flight
    # the moments, from the components: a dropped or doubled term changes one of them
    base = comps["parameters"] + comps["gradients"] + comps["optimizer"] + framework
    freed = 4 * (extra["P"] - extra["bucketed"])
    micro_chunks = extra["micro"] * extra["vpp"]
    act = comps["activations"]
    held = extra["bucket_held"] + (act + freed if micro_chunks > got.in_flight else max(act, freed))
    transient = (comps["working"] + comps["pipeline_buffers"] + comps["all_to_all"] + comps["autocast_weights"]
                 + max(comps["head_loss"], comps["embedding_grad"]))
    assert got.moments == {"backward": base - comps["gradients"] + held + transient,
                           "grad_reduce": base + comps["grad_reduce"],
                           "optimizer_step": base + comps["optimizer_step"],
                           "checkpoint_save": base - freed}
    assert got.peak == max(got.moments.values())


def test_staging_counts_on_the_device_only_when_it_is_the_host():
    from megatron_vpmoe.plan.memory import rank_memory

    cfg = _cfg()
    lay = _layout(world=4, ep=2, mb=4)
    off = rank_memory(cfg, lay, 0, "reference")
    on = rank_memory(cfg, lay, 0, "reference", staging_on_device=True)
    assert on.moments["checkpoint_save"] - off.moments["checkpoint_save"] == on.checkpoint_staging
    assert {k: v for k, v in on.moments.items() if k != "checkpoint_save"} == \
        {k: v for k, v in off.moments.items() if k != "checkpoint_save"}


def test_zero_divides_expert_state_by_expert_dp_not_dp():
    """ep=4 on 8 ranks: DP 8, expert-DP 2. The expert share of AdamW state is experts / 2."""
    from megatron_vpmoe.plan.memory import rank_memory

    cfg = _cfg()
    m = cfg.model
    plain = rank_memory(cfg, _layout(world=8, ep=4, mb=1), 0, "reference")
    zero = rank_memory(cfg, _layout(world=8, ep=4, mb=1, zero=True), 0, "reference")
    P, X = _params(m, 1, 0, 4), _experts(m, 1, 0, 4)
    assert plain.optimizer - zero.optimizer == 8 * P - int(8 * ((P - X) / 8 + X / 2))
    assert zero.optimizer == int(8 * ((P - X) / 8 + X / 2)) + 4 * _tensors(1, 0)


def test_working_memory_under_recompute():
    """Full recompute keeps only the layer input (t x h x a) and replays the layer in backward;
    selective replays beside its own saved tensors."""
    from megatron_vpmoe.plan.memory import layer_activation_bytes, rank_memory

    cfg = _cfg()
    t, h = 4 * cfg.data.seq_length, cfg.model.hidden_size
    none = rank_memory(cfg, _layout(world=1, mb=4), 0, "reference")
    full = rank_memory(cfg, _layout(world=1, mb=4, recompute="full"), 0, "reference")
    sel = rank_memory(cfg, _layout(world=1, mb=4, recompute="selective"), 0, "reference")
    assert layer_activation_bytes(cfg.model, 1, _layout(world=1, mb=4, recompute="full"), cfg.data.seq_length, 4,
                                  "reference") == {"layer_input": t * h * 4}
    assert full.working == t * h * 4 + none.working
    sel_one = max(sum(layer_activation_bytes(cfg.model, i, _layout(world=1, mb=4, recompute="selective"),
                                             cfg.data.seq_length, 4, "reference").values()) for i in range(4))
    assert sel.working == sel_one + none.working
    assert none.working == max(sum(layer_activation_bytes(cfg.model, i, _layout(world=1, mb=4), cfg.data.seq_length,
                                                          4, "reference").values()) for i in range(4))


# ---- step time ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_time_term(tp):
    """Ring all-reduce moves 2 (tp - 1) / tp of the activations, 4 times per layer (forward and backward of
    attention and MLP), each micro-batch; at tp = 4 the factor is 3/2 (1/2 at tp = 2)."""
    from megatron_vpmoe.plan.estimate import plan_layout
    from megatron_vpmoe.plan.gpu import load_gpu

    cfg = _cfg("model.num_attention_heads=8", "model.num_query_groups=4")
    gpu = load_gpu("h100-80gb")
    plan = plan_layout(cfg, _layout(world=tp, tp=tp, mb=4), gpu)
    t, h, layers = 4 * cfg.data.seq_length, cfg.model.hidden_size, cfg.model.num_layers
    micro = cfg.train.global_batch_size // 4  # dp 1, micro-batch 4
    assert plan.time_parts["tensor_parallel"] == pytest.approx(
        4 * t * h * 4 * 2 * (tp - 1) / tp * layers * micro / (gpu.nvlink_gbps * 1e9), rel=1e-12)


def test_step_time_terms():
    from megatron_vpmoe.plan.estimate import plan_layout
    from megatron_vpmoe.plan.gpu import load_gpu

    cfg = _cfg()
    gpu = load_gpu("h100-80gb")
    nv, ib, dom = gpu.nvlink_gbps * 1e9, gpu.ib_gbps * 1e9, gpu.nvlink_domain
    s = _sizes(cfg.model)
    seq, a = cfg.data.seq_length, 4
    # tp=2, ep=2, pp=2 on 16 ranks: dp 4, expert-dp 2, micro-batches 16 / (1 x 4) = 4
    lay = _layout(world=16, tp=2, ep=2, pp=2, mb=1)
    plan = plan_layout(cfg, lay, gpu, 0.5)
    parts = plan.time_parts
    t, micro = seq, 4
    assert plan.micro_batches == micro and plan.schedule == "1f1b"
    assert parts["bubble"] == pytest.approx(parts["compute"] * (2 - 1) / (1 * micro), rel=1e-12)
    bw_tp = nv  # TP x EP = 4 <= the NVLink domain
    assert parts["all_to_all"] == pytest.approx(
        4 * t * s["k"] * s["h"] * a * (2 - 1) / 2 * 2 * micro / bw_tp, rel=1e-12)  # 2 MoE layers on the busiest rank
    assert parts["tensor_parallel"] == pytest.approx(4 * t * s["h"] * a * 2 * (2 - 1) / 2 * 2 * micro / nv, rel=1e-12)
    bw_all = nv if 16 <= dom else ib
    assert parts["pipeline_p2p"] == pytest.approx(2 * t * s["h"] * a * micro * 1 / bw_all, rel=1e-12)
    bw_dp = nv if 16 // 2 <= dom else ib
    tight = max(plan.ranks, key=lambda r: r.params)
    experts = _experts(cfg.model, 2, tight.pp_rank, 2)
    dense = tight.params - experts
    assert parts["data_parallel"] == pytest.approx(
        2 * dense * 4 * (4 - 1) / 4 / bw_dp + 2 * experts * 4 * (2 - 1) / 2 / bw_dp, rel=1e-12)
    assert plan.step_s == pytest.approx(sum(parts.values()), rel=1e-12)
    tokens = cfg.train.global_batch_size * seq
    assert plan.tokens_per_s_per_gpu == pytest.approx(tokens / plan.step_s / 16, rel=1e-12)
    assert plan.mfu == pytest.approx(plan.flops_per_token * plan.tokens_per_s_per_gpu / gpu.peak_flops, rel=1e-12)


def test_fits_at_exactly_the_gpu_memory():
    from megatron_vpmoe.plan.estimate import plan_layout
    from megatron_vpmoe.plan.gpu import load_gpu

    cfg = _cfg()
    gpu = load_gpu("cpu")
    plan = plan_layout(cfg, _layout(world=1, mb=4), gpu)
    exact = replace(gpu, memory_gb=plan.peak / 1e9)
    assert plan_layout(cfg, _layout(world=1, mb=4), exact).fits  # peak == memory: fits
    less = replace(gpu, memory_gb=math.nextafter(plan.peak / 1e9, 0))
    assert not plan_layout(cfg, _layout(world=1, mb=4), less).fits
