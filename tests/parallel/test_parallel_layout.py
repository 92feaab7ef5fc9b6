"""Shards built under a fake process group (no communication) hold exactly what the layout arithmetic says."""

from __future__ import annotations

from dataclasses import replace

from megatron_vpmoe.config.schema import ParallelConfig


def _shard_params(cfg, layout, rank, world, fake_world):
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    from megatron_vpmoe.parallel.layout import shard_parameter_count
    fake_world(rank, world)
    ctx = init_parallel(ParallelConfig(**layout))
    pm = build_parallel_model(cfg, ctx, seed=3)
    built = sum(p.numel() for p in pm.parameters())
    expected = shard_parameter_count(cfg, tp=ctx.tp, ep=ctx.ep, pp=ctx.pp, vpp=ctx.vpp, pp_rank=ctx.pp_rank)
    return built, expected, ctx


def test_tp_ep_pp_shards_match_layout_arithmetic(fake_world):
    from helpers.model_configs import tiny_parallel_cfg as tiny_cfg
    cfg = replace(tiny_cfg(), num_layers=4, moe_aux_loss_coeff=0.0)  # biases on: the split rules matter
    layout = {"tensor": 2, "expert": 2, "pipeline": 2, "virtual_pipeline": 2}
    seen = set()
    for rank in range(8):
        built, expected, ctx = _shard_params(cfg, layout, rank, 8, fake_world)
        assert built == expected, (rank, built, expected)
        seen.add((ctx.tp_rank, ctx.ep_rank, ctx.pp_rank))
    assert len(seen) == 8


def test_vpmoe_6b_layout_shards_reduced(fake_world):
    """The 6B design's layout (EP=8 x PP=4 of 32 ranks) with fewer layers and a smaller vocabulary;
    ``benchmarks/scale.py --shard-6b`` builds the real size."""
    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.model.params import count_parameters
    cfg = load_config("examples/configs/vpmoe-6b.yaml", ["model.num_layers=8", "model.vocab_size=2048"])
    total = count_parameters(cfg.model).total
    stage_sum = 0
    for rank in (0, 8, 16, 31):  # one rank of each pipeline stage (EP rank 0, 1, 2, 7)
        built, expected, ctx = _shard_params(cfg.model, {"expert": 8, "pipeline": 4}, rank, 32, fake_world)
        assert built == expected
        assert ctx.ep == 8 and ctx.pp == 4 and ctx.dp == 8
        stage_sum += built
    # the four stages of one EP rank: replicated parts once, experts / 8
    routed = count_parameters(cfg.model).components["routed_experts"]
    assert stage_sum == total - routed + routed // 8


def test_locked_attention_shards_match_layout_arithmetic(fake_world):
    """TPA's head factors split over TP, its dim factors and GRAPE-M whole on every rank."""
    from helpers.model_configs import locked_parallel_cfg as locked_cfg
    cfg = replace(locked_cfg(), grape_m_learnable_basis=True)  # biases on
    for rank in range(4):
        built, expected, _ = _shard_params(cfg, {"tensor": 2, "pipeline": 2}, rank, 4, fake_world)
        assert built == expected, (rank, built, expected)
