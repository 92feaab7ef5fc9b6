"""Config schema, validation errors, overrides, the CLI, and parameter accounting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_vpmoe.config import config_from_dict, load_config, save_resolved_config
from megatron_vpmoe.model.params import count_parameters
from megatron_vpmoe.utils.errors import ConfigError
from helpers.paths import ROOT

CONFIGS = ROOT / "examples" / "configs"


def write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def base() -> dict:
    return yaml.safe_load((CONFIGS / "tiny-cpu.yaml").read_text())


@pytest.mark.parametrize("name", ["tiny-cpu", "small", "vpmoe-6b"])
def test_example_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.num_layers > 0


def test_unknown_key_names_key_and_file(tmp_path):
    values = base()
    values["model"]["num_atention_heads"] = 4
    path = write(tmp_path, values)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "model.num_atention_heads" in msg
    assert "did you mean 'num_attention_heads'" in msg


def test_unknown_section(tmp_path):
    values = base()
    values["optimiser"] = {"lr": 1}
    with pytest.raises(ConfigError, match=r"optimiser: unknown key"):
        load_config(write(tmp_path, values))


@pytest.mark.parametrize(
    "section,key,value,expect",
    [
        ("model", "hidden_size", "big", "model.hidden_size: expected an integer"),
        ("model", "qk_layernorm", 1, "model.qk_layernorm: expected true/false"),
        ("train", "steps", 1.5, "train.steps: expected an integer"),
        ("model", "activation", "relu", "model.activation: must be one of"),
    ],
)
def test_wrong_type(tmp_path, section, key, value, expect):
    values = base()
    values[section][key] = value
    with pytest.raises(ConfigError, match=expect):
        load_config(write(tmp_path, values))


def test_heads_not_divisible_by_tensor_parallel(tmp_path):
    values = base()
    values["parallel"]["tensor"] = 3
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, values))
    assert "parallel.tensor" in str(err.value)
    assert "num_attention_heads (4) is not divisible by the tensor-parallel size (3)" in str(err.value)


def test_experts_not_divisible_by_expert_parallel(tmp_path):
    values = base()
    values["parallel"]["expert"] = 3
    with pytest.raises(ConfigError, match=r"parallel.expert: model.num_moe_experts \(8\) is not divisible"):
        load_config(write(tmp_path, values))


def test_other_impossible_combinations():
    values = base()
    values["model"]["num_query_groups"] = 3
    with pytest.raises(ConfigError, match="model.num_query_groups"):
        config_from_dict(values)
    values = base()
    values["train"]["global_batch_size"] = 10
    values["train"]["micro_batch_size"] = 4
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        config_from_dict(values)
    values = base()
    values["model"]["moe_router_topk"] = 6  # 1 group of 4 experts reachable
    with pytest.raises(ConfigError, match="model.moe_router_topk"):
        config_from_dict(values)
    values = base()
    values["data"]["blend"] = [["heavy", "prefix"]]
    with pytest.raises(ConfigError, match=r"data.blend\[0\]"):
        config_from_dict(values)


def test_world_size_layout():
    cfg = config_from_dict({**base(), "parallel": {"tensor": 2, "pipeline": 1, "expert": 2}})
    assert cfg.parallel.resolve_data(4) == 2
    with pytest.raises(ConfigError, match="world size 3"):
        cfg.parallel.resolve_data(3)
    assert cfg.train.check_batch_layout(2) == 2  # 16 / (4 x 2)


def test_overrides(tmp_path):
    path = write(tmp_path, base())
    cfg = load_config(path, ["train.steps=7", "train.schedule.warmup_steps=2", "train.optimizer.lr=1e-2", "model.local_global_pattern=[1, 1]",
                             "run.dir=" + str(tmp_path / "r")])
    assert cfg.train.steps == 7 and cfg.train.optimizer.lr == 0.01
    assert cfg.model.local_global_pattern == [1, 1]
    with pytest.raises(ConfigError, match="--set:train.optimizer.lrr: unknown key"):
        load_config(path, ["train.optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="expects section.key=value"):
        load_config(path, ["train.steps"])
    saved = save_resolved_config(cfg)
    assert load_config(saved).train.steps == 7


def test_layer_schedule():
    cfg = config_from_dict(base()).model
    assert [cfg.is_global_layer(i) for i in range(8)] == [False, False, False, True] * 2
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, True, True]


def test_vpmoe_6b_parameter_count_matches_hand_count():
    """Hand count of the design in the issue, written out independently of params.py."""
    V, H, L, heads, groups, d = 201_088, 1024, 80, 8, 2, 128
    E, k, fe, fs, f_dense = 256, 4, 128, 512, 4096
    embed_head = 2 * V * H
    attn = H * heads * d + 2 * H * groups * d + heads * d * H  # q, k, v, o
    attn += 2 * d + heads  # qk-norm weights, softmax offsets
    norms = 2 * H
    expert = 2 * H * fe
    moe_layer = attn + norms + H * E + E * expert + 2 * H * fs
    dense_layer = attn + norms + 2 * H * f_dense
    total = embed_head + dense_layer + (L - 1) * moe_layer + (L - 1) + H  # + lambdas + final norm
    active = total - (L - 1) * (E - k) * expert
    counts = count_parameters(load_config(CONFIGS / "vpmoe-6b.yaml").model)
    assert abs(counts.total - total) / total < 0.005
    assert abs(counts.active - active) / active < 0.005
    assert counts.embedding_head == embed_head == 411_828_224
    assert 5.9e9 < counts.total < 6.2e9


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_vpmoe.cli", *args],
                          capture_output=True, text=True)


def test_cli_help_for_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ["config", "tokenizer", "preprocess", "train", "distill", "launch", "convert", "eval", "serve"]:
        assert cmd in out.stdout
        sub = run_cli(cmd, "--help")
        assert sub.returncode == 0, (cmd, sub.stderr)
        assert "usage: vpmoe " + cmd in sub.stdout


def test_cli_usage_error_is_one_line_exit_2():
    out = run_cli("no-such-command")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1


def test_cli_config_show_prints_counts():
    out = run_cli("config", "show", str(CONFIGS / "vpmoe-6b.yaml"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    total = [l for l in lines if l.startswith("total params: ")]
    assert total and int(total[0].split(": ")[1]) == count_parameters(
        load_config(CONFIGS / "vpmoe-6b.yaml").model).total
    assert any(l.startswith("active params per token: ") for l in lines)
    assert any(l.startswith("embedding+head params: 411828224") for l in lines)


def test_cli_config_error_exit_2(tmp_path):
    values = base()
    values["parallel"]["expert"] = 3
    out = run_cli("config", "validate", str(write(tmp_path, values)))
    assert out.returncode == 2
    assert "parallel.expert" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_every_config_key_is_documented():
    """The reference table is generated from the schema; a key without a meaning is a doc bug."""
    from megatron_vpmoe.config.reference import iter_keys

    keys = list(iter_keys())
    assert len(keys) > 80
    undocumented = [key for key, _tp, _default, meaning in keys if not meaning]
    assert not undocumented, f"add a trailing '# meaning' comment in schema.py for: {undocumented}"


def test_readme_config_reference_is_current(repo_root):
    """README's config reference is exactly `vpmoe config reference` (regenerate it when the schema changes)."""
    from megatron_vpmoe.config.reference import reference_markdown

    readme = (repo_root / "README.md").read_text()
    begin, end = "<!-- config-reference:begin -->\n", "<!-- config-reference:end -->"
    assert begin in readme and end in readme
    current = readme.split(begin, 1)[1].split(end, 1)[0]
    assert current == reference_markdown(), "README config reference is stale: run tools/update_readme_reference.py"


@pytest.mark.parametrize("override, key", [
    ("train.optimizer.lr=nan", "train.optimizer.lr"), ("train.optimizer.lr=.inf", "train.optimizer.lr"),
    ("train.optimizer.lr=-.inf", "train.optimizer.lr"), ("train.optimizer.beta1=1.5", "train.optimizer.beta1"),
    ("model.hidden_dropout=2.0", "model.hidden_dropout"), ("data.num_workers=-3", "data.num_workers"),
    ("checkpoint.interval=-1", "checkpoint.interval"), ("checkpoint.keep_last=-1", "checkpoint.keep_last"),
    ("model.norm_epsilon=-1", "model.norm_epsilon"), ("model.norm_epsilon=0", "model.norm_epsilon"),
    ("model.num_layers=100000000000", "model.num_layers"), ("run.seed=-1", "run.seed"),
    ("model.vocab_size=99999999999999999999999", "model.vocab_size"),
    ("train.optimizer.eps=0", "train.optimizer.eps"), ("distill.onpolicy.top_p=nan", "distill.onpolicy.top_p"),
    ("distill.onpolicy.scorers=[{kind: loglik, weight: .nan}]", "distill.onpolicy.scorers[0].weight"),
    ("data.blend=[[.nan, some/prefix]]", "data.blend[0][0]"), ("log.interval=0", "log.interval"),
])
def test_non_finite_and_out_of_range_numbers_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny-cpu.yaml", [override])
    assert err.value.key == key and str(err.value).startswith("--set:"), str(err.value)
    assert "\n" not in str(err.value)


def test_huge_structure_is_refused_before_counting(capsys):
    import time

    from megatron_vpmoe.cli import main

    start = time.perf_counter()
    rc = main(["config", "show", str(CONFIGS / "tiny-cpu.yaml"), "--set", "model.num_layers=100000000000"])
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "model.num_layers" in err and "10_000" in err, err


def test_every_numeric_key_has_a_range_and_its_default_is_inside():
    import dataclasses
    import typing

    from megatron_vpmoe.config.ranges import RANGES
    from megatron_vpmoe.config.reference import iter_keys
    from megatron_vpmoe.config.schema import ScorerConfig

    numeric = [key for key, tp, _d, _m in iter_keys() if "int" in tp or "float" in tp or key == "data.blend"]
    numeric += [f"distill.onpolicy.scorers.{f.name}" for f in dataclasses.fields(ScorerConfig)
                if typing.get_type_hints(ScorerConfig)[f.name] in (int, float)]
    assert sorted(numeric) == sorted(RANGES), set(numeric) ^ set(RANGES)
    from megatron_vpmoe.config.ranges import check_ranges
    from megatron_vpmoe.config.schema import VpmoeConfig

    check_ranges(VpmoeConfig())  # the defaults are inside their own ranges


def test_duplicate_yaml_key_names_key_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  optimizer:\n    lr: 0.1\n    beta1: 0.9\n    lr: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "'lr'" in msg and "line 5" in msg and "line 3" in msg, msg


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n\x00\x00", b"a: [\x00\n",
                                     b"train: {steps: 3\n", b"\xff\xfe" + "run: {}".encode("utf-16-le")])
def test_binary_or_broken_config_is_one_line(tmp_path, capsys, content):
    from megatron_vpmoe.cli import main

    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    rc = main(["config", "validate", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(path) in err, err


def test_locked_config_counts_tpa_attention():
    """vpmoe-locked.yaml: TPA local layers counted from the closed form; ~5.36B total as designed."""
    cfg = load_config(CONFIGS / "vpmoe-locked.yaml").model
    h, d, heads, g = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    ranks = cfg.tpa_q_rank + 2 * cfg.tpa_kv_rank
    shared = 2 * d + heads + d // 2  # QK-norm, sinks, GRAPE-M frequencies (local) / none (global)
    tpa = h * heads * ranks + h * ranks * d + heads * d * h + shared
    gqa = h * (heads + 2 * g) * d + heads * d * h + 2 * d + heads
    local = sum(1 for i in range(cfg.num_layers) if not cfg.is_global_layer(i))
    attention = local * tpa + (cfg.num_layers - local) * gqa + cfg.num_layers - 1  # + value lambdas
    counts = count_parameters(cfg)
    assert counts.components["attention"] == attention
    assert counts.components["routed_experts"] == (cfg.num_layers - 1) * 256 * 2 * h * 112
    assert 5.35e9 < counts.total < 5.37e9
    out = run_cli("config", "show", str(CONFIGS / "vpmoe-locked.yaml"))
    assert out.returncode == 0, out.stderr
    assert f"total params: {counts.total}" in out.stdout.splitlines()
