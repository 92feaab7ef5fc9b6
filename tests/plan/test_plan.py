"""The capacity planner: activation bytes vs autograd's saved tensors, FLOPs vs the modules' matmul shapes,
shard bytes vs live shards, schedules, the search, and the CLI's one-line errors (exit 2)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from helpers.paths import ROOT

TINY = ROOT / "examples" / "configs" / "tiny-cpu.yaml"
SIXB = ROOT / "examples" / "configs" / "vpmoe-6b.yaml"


def _tiny(*overrides):
    from megatron_vpmoe.config.loader import load_config
    return load_config(TINY, ["data.mock=true", *overrides])


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run_main(*argv):
    """``vpmoe ARGV`` in this process (no interpreter start-up per call): exit code, stdout, stderr."""
    import contextlib
    import io

    from megatron_vpmoe.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    return _Result(code, out.getvalue(), err.getvalue())


def _cli(*args):
    return _run_main("plan", *args)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_activation_formula_matches_saved_tensors(mode, precision):
    """Per micro-batch saved bytes of the whole tiny model (dense + MoE layers, sliding-window + global
    attention, value residual, sinks) as derived from shapes == what autograd keeps: within 1% in fp32;
    within 5% under bf16 autocast (the meter also holds autocast's bf16 weight copies, under 1 MB here,
    which the planner counts apart)."""
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.plan.layouts import Layout
    from megatron_vpmoe.plan.memory import chunk_activation_bytes
    from megatron_vpmoe.utils.memory import SavedActivationMeter

    cfg = _tiny().model
    b, s = 2, 128
    torch.manual_seed(0)
    model = VpmoeModel(cfg)
    model.set_recompute(mode)
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    labels = torch.randint(0, cfg.vocab_size, (b, s))
    with SavedActivationMeter(exclude=model.parameters()) as meter, \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(ids, labels=labels).mean()
    a = 2 if precision == "bf16" else 4
    predicted = chunk_activation_bytes(cfg, Layout(world=1, mb=b, recompute=mode), s, a, "reference",
                                       list(range(cfg.num_layers)), True, True, True)
    tolerance = 0.01 if precision == "fp32" else 0.05
    assert abs(predicted - meter.peak) / meter.peak < tolerance, (predicted, meter.peak)


def _module_flops_per_token(model, cfg, seq) -> float:
    """Forward FLOPs per token counted from the built modules' weight shapes and the attention masks."""
    from megatron_vpmoe.model.layers import SelfAttention
    from megatron_vpmoe.model.moe import GroupedExperts, Router

    total = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            total += 2 * module.weight.numel()
        elif isinstance(module, Router):
            total += 2 * module.weight.numel()
        elif isinstance(module, GroupedExperts):  # topk experts per token
            per_expert = (module.fc1_weight.numel() + module.fc2_weight.numel()) / module.num_local_experts
            total += 2 * cfg.moe_router_topk * per_expert
        elif isinstance(module, SelfAttention):
            q = torch.arange(seq).unsqueeze(1)
            k = torch.arange(seq).unsqueeze(0)
            visible = k <= q
            if module.window is not None:
                visible &= k > q - module.window
            # scores and weighted values: two matmuls over the visible keys of every head
            total += 2 * 2 * module.heads * module.head_dim * visible.sum().item() / seq
    if not cfg.untie_embeddings_and_output_weights:
        total += 2 * model.embedding.weight.numel()  # the tied head; the lookup itself is no matmul
    return total


@pytest.mark.parametrize("untie", [False, True])
def test_flops_per_token_equals_module_count(untie):
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.plan.flops import training_flops_per_token

    cfg = replace(_tiny().model, untie_embeddings_and_output_weights=untie)
    assert cfg.window_size < 128 and any(cfg.is_global_layer(i) for i in range(cfg.num_layers))
    assert any(cfg.is_moe_layer(i) for i in range(cfg.num_layers)) and not cfg.is_moe_layer(0)
    model = VpmoeModel(cfg)
    counted = _module_flops_per_token(model, cfg, 128)
    assert math.isclose(training_flops_per_token(cfg, 128), 3 * counted, rel_tol=1e-12)


def test_shard_bytes_match_live_model_and_optimizer():
    """Parameters, gradients and AdamW state of a trained single-process model, byte for byte."""
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.plan.layouts import Layout
    from megatron_vpmoe.plan.memory import rank_memory
    from megatron_vpmoe.training.memory_report import tensor_bytes
    from megatron_vpmoe.training.optimizer import build_optimizer

    cfg = _tiny()
    model = VpmoeModel(cfg.model)
    opt = build_optimizer(model, cfg.train.optimizer)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 16))
    model(ids, labels=ids).mean().backward()
    opt.step()
    pred = rank_memory(cfg, Layout(world=1, mb=1), 0, "reference")
    params = list(model.parameters())
    assert pred.parameters == tensor_bytes(params)
    assert pred.gradients == tensor_bytes(p.grad for p in params)
    assert pred.optimizer == tensor_bytes(t for s in opt.state.values() for t in s.values())


@pytest.mark.parametrize("layout,rank,world", [
    (dict(tensor=2, expert=2, pipeline=2), 0, 8), (dict(tensor=2, expert=2, pipeline=2), 7, 8),
    (dict(pipeline=2, virtual_pipeline=2, expert=2), 3, 4)])
def test_tensor_count_matches_sharded_build(fake_world, layout, rank, world):  # noqa: F811
    """AdamW's per-tensor ``step`` makes the optimizer bytes depend on the tensor count of the shard."""
    from megatron_vpmoe.config.schema import ParallelConfig
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    from megatron_vpmoe.plan.memory import shard_tensor_count

    cfg = _tiny().model
    fake_world(rank, world)
    ctx = init_parallel(ParallelConfig(**layout))
    pm = build_parallel_model(cfg, ctx, seed=3)
    assert len(list(pm.parameters())) == shard_tensor_count(cfg, ctx.pp, ctx.vpp, ctx.pp_rank)


def test_in_flight_per_schedule():
    from megatron_vpmoe.plan.layouts import Layout
    from megatron_vpmoe.plan.memory import in_flight

    one_f_one_b = Layout(world=4, pp=4, mb=1)
    assert [in_flight(one_f_one_b, 16, r) for r in range(4)] == [4, 3, 2, 1]
    assert one_f_one_b.schedule(2) == "gpipe" and in_flight(one_f_one_b, 2, 0) == 2
    assert in_flight(Layout(world=1), 16, 0) == 1
    inter = Layout(world=4, pp=4, vpp=2, mb=1)
    assert in_flight(inter, 16, 0) == 3 * 2 + 4 + 1  # Megatron's interleaved warm-up + 1


def test_6b_search_on_4x8_h100_finds_fitting_layouts():
    from megatron_vpmoe.config.loader import load_config
    from megatron_vpmoe.plan.gpu import load_gpu
    from megatron_vpmoe.plan.search import search

    cfg = load_config(SIXB, [])
    res = search(cfg, 32, 8, load_gpu("h100-80gb"))
    assert res.fitting and all(p.fits for p in res.fitting)
    best = res.fitting[0]
    assert best.tokens_per_s_per_gpu == max(p.tokens_per_s_per_gpu for p in res.fitting)
    assert 0 < best.mfu < 1
    # shrink the GPU: families fail with the component that overflows named
    small = replace(load_gpu("h100-80gb"), memory_gb=30)
    res = search(cfg, 32, 8, small)
    assert any("GB on pipeline rank" in text and "> 30 GB" in text for text in res.rejected.values())


def test_cli_layout_table_and_json():
    out = _cli("--config", str(TINY), "--set", "data.mock=true", "--nodes", "1", "--gpus-per-node", "2",
               "--gpu", "cpu", "--layout", "pp=2,mb=2,recompute=full")
    assert out.returncode == 0, out.stderr
    assert "| pp rank |" in out.stdout and "fits" in out.stdout
    js = _cli("--config", str(TINY), "--set", "data.mock=true", "--gpus-per-node", "2", "--gpu", "cpu",
              "--layout", "ep=2", "--json")
    data = json.loads(js.stdout)
    assert data["layout"]["ep"] == 2 and data["fits"] and len(data["ranks"]) == 1


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    cases = {"--layout tp": ["--layout", "tp=3"], "--layout": ["--layout", "pipe=2"]}
    for key, extra in cases.items():
        out = _cli("--config", str(TINY), "--set", "data.mock=true", "--gpus-per-node", "4", "--gpu", "cpu", *extra)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = _cli("--config", str(TINY), "--gpus-per-node", "4", "--gpu", "cpu", "--layout", "tp=3")
    assert "parallel.tensor" in out.stderr  # heads (4) not divisible by 3: the trainer's own check names it
    spec = tmp_path / "gpu.yaml"
    spec.write_text((ROOT / "megatron_vpmoe" / "plan" / "gpus" / "h100-80gb.yaml").read_text().replace("ib_gbps: 50", ""))
    out = _cli("--config", str(TINY), "--gpu", str(spec))
    assert out.returncode == 2 and "ib_gbps" in out.stderr and str(spec) in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    tiny_gpu = tmp_path / "tiny.yaml"
    tiny_gpu.write_text((ROOT / "megatron_vpmoe" / "plan" / "gpus" / "cpu.yaml").read_text()
                        .replace("memory_gb: 24", "memory_gb: 0.001"))
    out = _cli("--config", str(TINY), "--gpus-per-node", "2", "--gpu", str(tiny_gpu))
    assert out.returncode == 2 and "no layout" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_launch_slurm_refuses_a_predicted_non_fit_unless_forced(tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text((ROOT / "megatron_vpmoe" / "plan" / "gpus" / "cpu.yaml").read_text()
                     .replace("memory_gb: 24", "memory_gb: 0.01"))
    base = ["launch", "slurm", "--nodes", "1", "--gpus-per-node", "2",
            "--config", str(TINY), "--set", f"run.dir={tmp_path / 'run'}", "--paths-on-cluster", "--dry-run"]
    out = _run_main(*base, "--gpu", str(small))
    assert out.returncode == 2 and "predicted not to fit" in out.stderr and "#!/bin/bash" not in out.stdout
    forced = _run_main(*base, "--gpu", str(small), "--force")
    assert forced.returncode == 0 and "#!/bin/bash" in forced.stdout and "DOES NOT FIT" in forced.stderr
    fits = _run_main(*base, "--gpu", "cpu")
    assert fits.returncode == 0 and "fits" in fits.stderr
    assert not (tmp_path / "run" / "launch").exists()  # a dry run writes nothing
    assert "layout tp=1,ep=1,pp=1,mb=4" in fits.stderr
    # the job prints the plan into its own log (the file a real submission writes)
    assert f"cat {tmp_path / 'run' / 'launch' / 'plan.txt'}" in fits.stdout
