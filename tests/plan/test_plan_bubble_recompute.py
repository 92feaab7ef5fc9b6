"""Pinning tests for planner terms: the pipeline bubble and selective recompute's attention replay."""

from pathlib import Path

import pytest

from megatron_vpmoe.config.loader import load_config
from megatron_vpmoe.plan.estimate import plan_layout
from megatron_vpmoe.plan.gpu import load_gpu
from megatron_vpmoe.plan.layouts import Layout
from megatron_vpmoe.plan.throughput import rank_compute

SMALL = Path(__file__).resolve().parents[2] / "examples" / "configs" / "small.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(SMALL)


def test_bubble_is_pp_minus_1_over_vpp_times_micro_batches(cfg):
    gpu = load_gpu("h100-80gb")
    # world 2, pp 2: dp 1; global batch 32 / mb 4 = 8 micro-batches
    for vpp, want in ((1, 1 / 8), (2, 1 / 16)):
        plan = plan_layout(cfg, Layout(world=2, pp=2, vpp=vpp, mb=4), gpu)
        assert plan.time_parts["bubble"] == pytest.approx(plan.time_parts["compute"] * want)


def test_selective_recompute_replays_the_attention_core_once(cfg):
    gpu = load_gpu("h100-80gb")
    attention = {rc: rank_compute(cfg, Layout(world=1, mb=4, recompute=rc), gpu, 0, 8).attention
                 for rc in ("none", "selective", "full")}
    assert attention["selective"] == pytest.approx(attention["none"] * 4 / 3)
    assert attention["full"] == pytest.approx(attention["none"] * 4 / 3)
