"""The planner's throughput model (plan/throughput.py): predicted tokens/s within +-25% of every measured
device run in benchmarks/results, its op table against a live dispatch count, and each term's behaviour."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.paths import ROOT

RESULTS = ROOT / "benchmarks" / "results"
MEDIUM = ROOT / "examples" / "configs" / "medium-cpu.yaml"


def _device_runs():
    runs = []
    for path in sorted(RESULTS.glob("device_step*_cuda.json")):
        res = json.loads(path.read_text())
        bf16 = [r for r in res["runs"] if r["variant"] == "bf16" and r["rc"] == 0]
        if bf16:
            runs.append(pytest.param(res, bf16[0], id=path.stem))
    return runs


@pytest.mark.parametrize("res,run", _device_runs())
def test_prediction_is_within_25_percent_of_every_measured_device_run(res, run):
    """The calibrated model, with no efficiency given, against each bf16 (Triton) run's median tokens/s."""
    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.plan.estimate import plan_layout
    from megatron_vpmoe.plan.gpu import load_gpu
    from megatron_vpmoe.plan.layouts import from_config

    cfg = load_config(ROOT / res["config"], [*res["overrides"], "data.mock=true", f"data.seq_length={res['seq']}",
                                             f"train.global_batch_size={res['gbs']}",
                                             f"train.micro_batch_size={res['mbs']}", "train.precision=bf16"])
    plan = plan_layout(cfg, from_config(cfg, 1), load_gpu(res["plan_gpu"]))
    ratio = plan.tokens_per_s_per_gpu / run["median_tokens_per_s"]
    assert 0.75 <= ratio <= 1.25, (res["config"], res["mbs"], ratio, plan.compute_parts)


def test_there_are_measured_runs_to_check():
    assert len(_device_runs()) >= 3


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops(layers: int, dense: int) -> int:
    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.model import VpmoeModel

    cfg = load_config(MEDIUM, [f"model.num_layers={layers}", f"model.moe_first_k_dense={dense}",
                               "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
                               "model.kv_channels=16", "model.ffn_hidden_size=64", "model.moe_ffn_hidden_size=16",
                               "model.moe_shared_expert_intermediate_size=16", "model.vocab_size=256",
                               "model.num_moe_experts=8", "model.moe_router_num_groups=2", "model.moe_router_group_topk=2"])
    torch.manual_seed(0)
    model = VpmoeModel(cfg.model)
    ids = torch.randint(0, 256, (2, 32))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).mean()
        loss.backward()

    step()  # first-call set-up (lazy buffers) is not a step's work
    with _CountOps() as count:
        step()
    return count.n


def test_op_table_matches_a_live_dispatch_count():
    """OPS_PER_MICRO_BATCH (the host term) within 10% of aten ops dispatched by one forward + backward."""
    from megatron_vpmoe.plan.throughput import OPS_PER_MICRO_BATCH as table

    one_moe, two_moe, two_dense = _ops(2, 1), _ops(3, 1), _ops(3, 2)
    moe = two_moe - one_moe
    dense = two_dense - two_moe + moe
    rest = one_moe - dense - moe
    for name, counted in (("moe_layer", moe), ("dense_layer", dense), ("embedding_and_head", rest)):
        assert abs(table[name] - counted) <= 0.1 * counted, (name, table[name], counted)


def _medium(*sets):
    from megatron_vpmoe.config.loader import load_config

    return load_config(MEDIUM, ["data.seq_length=2048", "train.precision=bf16", *sets])


def test_terms_follow_the_shapes():
    """More tokens per expert raise the grouped GEMMs' rate; ZeRO divides the optimizer's bytes; full
    recompute adds a forward; the host term counts ops per micro-batch; fp32 has no cast term."""
    from megatron_vpmoe.plan.gpu import load_gpu
    from megatron_vpmoe.plan.layouts import from_config
    from megatron_vpmoe.plan.throughput import HOST_OP_S, M_HALF, OPS_PER_MICRO_BATCH, expert_tokens, rank_compute

    gpu = load_gpu("h200")
    cfg = _medium("train.global_batch_size=16", "train.micro_batch_size=4")
    lay = from_config(cfg, 1)
    base = rank_compute(cfg, lay, gpu, 0, 4)
    m = cfg.model
    assert expert_tokens(m, lay, 4 * 2048) == 4 * 2048 * m.moe_router_topk / m.num_moe_experts
    assert expert_tokens(m, replace(lay, ep=4), 8192) == 4 * expert_tokens(m, lay, 8192)
    ops = OPS_PER_MICRO_BATCH["dense_layer"] + 15 * OPS_PER_MICRO_BATCH["moe_layer"] + \
        OPS_PER_MICRO_BATCH["embedding_and_head"]
    assert base.host == pytest.approx(4 * ops * HOST_OP_S)
    assert base.bound == "host" and base.step_s == pytest.approx(base.host + base.optimizer)
    big = rank_compute(_medium("train.global_batch_size=64", "train.micro_batch_size=16"),
                       replace(lay, mb=16), gpu, 0, 4)
    # 4x the tokens per expert (512 -> 2048) at the rate m / (m + M_HALF): 4x the work in less than 4x the time
    rate = (512 / (512 + M_HALF)) / (2048 / (2048 + M_HALF))
    assert big.experts == pytest.approx(4 * base.experts * rate) and big.experts < 2.6 * base.experts
    assert big.bound == "device"
    full = rank_compute(cfg, replace(lay, recompute="full"), gpu, 0, 4)
    assert full.attention == pytest.approx(base.attention * 4 / 3) and full.experts == pytest.approx(base.experts * 4 / 3)
    assert base.gemm < full.gemm < base.gemm * 4 / 3  # the LM head is not recomputed
    fp32 = rank_compute(_medium("train.global_batch_size=16", "train.micro_batch_size=4", "train.precision=fp32"),
                        lay, gpu, 0, 4)
    assert fp32.memory < base.memory * 2  # activations double, the per-micro-batch casts go


def test_flat_efficiency_is_still_an_explicit_what_if():
    from megatron_vpmoe.plan.estimate import plan_layout
    from megatron_vpmoe.plan.gpu import load_gpu
    from megatron_vpmoe.plan.layouts import from_config

    cfg = _medium("train.global_batch_size=16", "train.micro_batch_size=4")
    gpu = load_gpu("h200")
    flat = plan_layout(cfg, from_config(cfg, 1), gpu, efficiency=0.4)
    assert flat.bound == "flat" and flat.mfu == pytest.approx(0.4, rel=1e-6)
    model = plan_layout(cfg, from_config(cfg, 1), gpu)
    assert model.bound == "host" and model.mfu < 0.1
