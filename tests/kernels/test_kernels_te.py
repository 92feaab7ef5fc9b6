"""kernels.te: Transformer Engine detection and fallbacks on CPU, and the TE branch against a fake TE."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn as nn

from megatron_vpmoe.kernels import reference, te
from megatron_vpmoe.utils.errors import VpmoeError


def test_unavailable_on_cpu_host():
    status = te.te_status()
    assert not status.available
    assert "CUDA" in status.reason or "transformer_engine" in status.reason


def test_fallbacks_on_cpu():
    lin = te.linear(8, 4, bias=False)
    assert type(lin) is nn.Linear and lin.bias is None and lin.weight.shape == (4, 8)
    nl = te.layernorm_linear(8, 4)
    x = torch.randn(3, 8)
    expected = reference.rms_norm(x, nl.layer_norm_weight) @ nl.weight.t()
    torch.testing.assert_close(nl(x), expected)
    ln = te.layernorm_linear(8, 4, bias=True, normalization="LayerNorm")
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (8,)) @ ln.weight.t() + ln.bias)
    with pytest.raises(VpmoeError, match="normalization"):
        te.layernorm_linear(8, 4, normalization="BatchNorm")
    with te.fp8_autocast(enabled=False):
        pass


def test_requiring_te_on_cpu_is_a_clear_error():
    with pytest.raises(VpmoeError, match="Transformer Engine requested but unavailable: no CUDA"):
        te.linear(8, 4, use_te=True)
    with pytest.raises(VpmoeError, match="unavailable"):
        te.fp8_autocast(enabled=True)
    with pytest.raises(VpmoeError, match="unknown FP8 recipe 'e3m4'"):
        te.fp8_recipe("e3m4")


@pytest.fixture
def fake_te(monkeypatch):
    """A stand-in ``transformer_engine`` package and a CUDA device, to exercise the TE branch."""
    calls = []

    class Linear(nn.Linear):
        """Like TE's: ``parallel_mode`` column/row keeps the local shard of the weight."""

        def __init__(self, i, o, bias=True, parallel_mode=None, tp_group=None, tp_size=1):
            calls.append(("Linear", i, o, bias) + ((parallel_mode, tp_size) if parallel_mode else ()))
            if parallel_mode == "column":
                o //= tp_size
            elif parallel_mode == "row":
                i //= tp_size
            super().__init__(i, o, bias=bias)

    class LayerNormLinear(nn.Module):
        def __init__(self, i, o, bias=False, eps=1e-5, normalization="LayerNorm"):
            super().__init__()
            calls.append(("LayerNormLinear", i, o, bias, eps, normalization))

    class Format:
        HYBRID = "hybrid"

    class DelayedScaling:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    root = types.ModuleType("transformer_engine")
    root.__version__ = "9.9-fake"
    pt = types.ModuleType("transformer_engine.pytorch")
    pt.Linear, pt.LayerNormLinear = Linear, LayerNormLinear
    pt.fp8_autocast = lambda enabled, fp8_recipe: calls.append(("fp8_autocast", fp8_recipe)) or \
        __import__("contextlib").nullcontext()
    common = types.ModuleType("transformer_engine.common")
    recipe = types.ModuleType("transformer_engine.common.recipe")
    recipe.Format, recipe.DelayedScaling = Format, DelayedScaling
    for name, module in {"transformer_engine": root, "transformer_engine.pytorch": pt,
                         "transformer_engine.common": common,
                         "transformer_engine.common.recipe": recipe}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("VPMOE_DISABLE_TE", raising=False)
    return calls


def test_te_branch_with_fake_te(fake_te, monkeypatch):
    assert te.te_status() == te.TEStatus(True, "", "9.9-fake")
    lin = te.linear(16, 8, bias=False)
    assert fake_te[-1] == ("Linear", 16, 8, False)
    assert type(lin).__name__ == "Linear" and type(lin) is not nn.Linear
    assert type(te.linear(16, 8, use_te=False)) is nn.Linear
    te.layernorm_linear(16, 8, eps=1e-6)
    assert fake_te[-1] == ("LayerNormLinear", 16, 8, False, 1e-6, "RMSNorm")
    recipe = te.fp8_recipe("delayed", amax_history_len=16)
    assert recipe.kwargs == dict(fp8_format="hybrid", margin=0, amax_history_len=16,
                                 amax_compute_algo="max")
    with pytest.raises(VpmoeError, match="no Float8CurrentScaling"):
        te.fp8_recipe("current")
    with te.fp8_autocast(enabled=True):
        pass
    assert fake_te[-1][0] == "fp8_autocast"
    monkeypatch.setenv("VPMOE_DISABLE_TE", "1")
    assert te.te_status() == te.TEStatus(False, "disabled by VPMOE_DISABLE_TE")
    assert type(te.linear(16, 8)) is nn.Linear


def test_broken_te_install_reports_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import raises ImportError
    status = te.te_status()
    assert not status.available and "not importable" in status.reason


def test_factories_plug_into_the_model_linear_spec():
    """The documented hook: ``LinearSpec(column=te.linear, row=te.linear)`` builds the same model."""
    from megatron_vpmoe.config.schema import ModelConfig
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.model.layers import LinearSpec

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=2,
                      num_query_groups=1, kv_channels=16, ffn_hidden_size=64, window_size=4,
                      num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
                      moe_shared_expert_intermediate_size=16, moe_router_num_groups=2,
                      moe_router_group_topk=1)
    torch.manual_seed(0)
    plain = VpmoeModel(cfg)
    torch.manual_seed(0)
    hooked = VpmoeModel(cfg, spec=LinearSpec(column=te.linear, row=te.linear))
    ids = torch.randint(0, 64, (1, 6))
    torch.testing.assert_close(hooked(ids), plain(ids))


def _tiny_model_config():
    from megatron_vpmoe.config.schema import ModelConfig

    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=2,
                       num_query_groups=2, kv_channels=16, ffn_hidden_size=64, window_size=4,
                       num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
                       moe_shared_expert_intermediate_size=16, moe_router_num_groups=2,
                       moe_router_group_topk=1)


def test_engine_builds_te_linears_when_asked(fake_te):
    """``train.transformer_impl: transformer_engine``: the engine's model has TE linears (here
    the fake's) and computes what the local model computes; at TP > 1 the TE layers are asked
    for column/row parallelism over the TP group and tagged as TP shards."""
    from megatron_vpmoe.config.schema import ParallelConfig
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.parallel import build_parallel_model, init_parallel
    from megatron_vpmoe.parallel.tensor import te_linear_spec

    cfg = _tiny_model_config()
    pm = build_parallel_model(cfg, init_parallel(ParallelConfig()), seed=3, transformer_impl="transformer_engine")
    te_layers = [m for m in pm.module.modules() if type(m).__name__ == "Linear" and type(m) is not nn.Linear]
    # every projection of the layers; the LM head stays a plain weight for the chunked loss
    assert len(te_layers) == 8
    assert [n for n, m in pm.module.named_modules() if type(m) is nn.Linear] == ["output_layer"]
    torch.manual_seed(3)
    local = VpmoeModel(cfg)  # what build_parallel_model initialises from
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(pm.module(ids), local(ids))

    spec = te_linear_spec(2, tp_group="tp-group")
    col, row = spec.column(32, 64, True), spec.row(64, 32, True)
    assert fake_te[-2:] == [("Linear", 32, 64, True, "column", 2), ("Linear", 64, 32, True, "row", 2)]
    from megatron_vpmoe.model.splits import Split, SplitKind, declared_split
    assert col.weight.shape == (32, 32) and declared_split(col.weight) == Split(SplitKind.TENSOR, 0)
    assert declared_split(col.bias) == Split(SplitKind.TENSOR, 0)
    assert row.weight.shape == (32, 32) and declared_split(row.weight) == Split(SplitKind.TENSOR, 1)
    assert declared_split(row.bias) is None  # added after the reduction


def test_trainer_refuses_transformer_engine_where_it_cannot_run(tmp_path):
    from helpers.train_support import tiny_config

    from megatron_vpmoe.training.trainer import Trainer
    from megatron_vpmoe.utils.errors import ConfigError

    cfg = tiny_config(tmp_path, train={"transformer_impl": "transformer_engine"})
    with pytest.raises(ConfigError, match="no CUDA") as err:
        Trainer(cfg, quiet=True)
    assert err.value.key == "train.transformer_impl"
    with pytest.raises(ConfigError, match="Transformer Engine") as err:
        tiny_config(tmp_path, train={"fp8": "delayed"})
    assert err.value.key == "train.fp8"
