"""`vpmoe plan --gpu h100` and the other obvious aliases resolve to shipped specs; A100-40GB ships."""

import pytest

from megatron_vpmoe.plan.gpu import ALIASES, load_gpu, shipped_gpus
from megatron_vpmoe.utils.errors import ConfigError


@pytest.mark.parametrize("alias, shipped", [("h100", "h100-80gb"), ("H100", "h100-80gb"), ("h100_sxm", "h100-80gb"),
                                            ("a100", "a100-40gb"), ("a100-80", "a100-80gb"), ("A100 40GB", "a100-40gb"),
                                            ("h200-141gb", "h200"), ("gb200-nvl72", "gb200")])
def test_aliases_load_the_shipped_spec(alias, shipped):
    assert load_gpu(alias) == load_gpu(shipped)


def test_a100_40gb_ships_with_published_numbers():
    spec = load_gpu("a100-40gb")
    assert (spec.memory_gb, spec.bf16_dense_tflops, spec.nvlink_gbps) == (40, 312, 300)
    assert "a100-40gb" in shipped_gpus()
    assert any("1,555 GB/s" in s for s in spec.sources)


def test_every_alias_names_a_shipped_spec_and_unknown_names_list_them():
    assert set(ALIASES.values()) <= set(shipped_gpus())
    with pytest.raises(ConfigError, match="aliases: .*h100"):
        load_gpu("v100")


def test_plan_cli_accepts_gpu_h100(capsys):
    from megatron_vpmoe.cli import main

    assert main(["plan", "--config", "examples/configs/tiny-cpu.yaml", "--nodes", "1", "--gpus-per-node", "1",
                 "--gpu", "h100", "--json"]) == 0
    assert "H100 SXM 80GB" in capsys.readouterr().out
