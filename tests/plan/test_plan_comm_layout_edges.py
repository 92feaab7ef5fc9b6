"""Pinning tests: the expert all-to-all's bandwidth spans TP x EP ranks, and interleaved 1F1B's
micro-batch count must be a multiple of pp (not of vpp)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from helpers.paths import ROOT

TINY = ROOT / "examples" / "configs" / "tiny-cpu.yaml"


def _cfg(*overrides):
    from megatron_vpmoe.config.loader import load_config
    return load_config(TINY, ["data.mock=true", *overrides])


def test_all_to_all_over_tp_x_ep_beyond_the_nvlink_domain_runs_at_infiniband():
    from megatron_vpmoe.plan.estimate import plan_layout
    from megatron_vpmoe.plan.gpu import load_gpu
    from megatron_vpmoe.plan.layouts import Layout

    cfg = _cfg()
    m = cfg.model
    # 4 GPUs per NVLink domain: EP = 4 alone would fit, but TP x EP = 8 ranks cross InfiniBand
    gpu = replace(load_gpu("h100-80gb"), nvlink_domain=4, nvlink_gbps=900.0, ib_gbps=50.0)
    lay = Layout(world=8, tp=2, ep=4, mb=4)
    plan = plan_layout(cfg, lay, gpu)
    t = 4 * cfg.data.seq_length
    a = 2 if cfg.train.precision == "bf16" else 4
    moe_layers = sum(1 for i in range(m.num_layers) if m.is_moe_layer(i))
    micro = cfg.train.global_batch_size // (4 * 4)  # dp = 8 / tp = 4
    per = t * m.moe_router_topk * m.hidden_size * a * 3 / 4
    assert plan.time_parts["all_to_all"] == pytest.approx(4 * per * moe_layers * micro / 50e9, rel=1e-12)


def test_interleaved_micro_batches_must_divide_by_pp_not_vpp():
    from megatron_vpmoe.plan.layouts import Layout, check_layout
    from megatron_vpmoe.utils.errors import ConfigError

    cfg = _cfg("model.num_layers=8")
    gbs = cfg.train.global_batch_size
    # 2 micro-batches: a multiple of pp = 2, not of vpp = 4 -> valid
    ok = Layout(world=2, pp=2, vpp=4, mb=gbs // 2)
    assert ok.micro_batches(gbs) == 2
    check_layout(cfg, ok)
    # 1 micro-batch: not a multiple of pp -> refused, naming the key
    bad = Layout(world=2, pp=2, vpp=4, mb=gbs)
    with pytest.raises(ConfigError, match="multiple of pp"):
        check_layout(cfg, bad)
