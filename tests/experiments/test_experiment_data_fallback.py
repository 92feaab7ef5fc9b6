"""The experiment presets read data: paths from the one data folder and, on the embedded default (no ../shared), skip what it lacks instead of failing."""

import pytest

from megatron_vpmoe.experiments.tokenizers import load_experiment_config
from megatron_vpmoe.utils.errors import ConfigError
from megatron_vpmoe.utils.paths import embedded_data_dir
from helpers.paths import ROOT

PRESET = ROOT / "examples" / "experiments" / "tokenizers-cpu.yaml"


def test_cpu_preset_loads_on_the_embedded_default(monkeypatch, capsys):
    monkeypatch.setenv("VPMOE_DATA", str(embedded_data_dir()))  # what a clone without ../shared gets
    exp = load_experiment_config(PRESET)
    data = embedded_data_dir()
    assert [s.path for s in exp.corpus] == [data / "kd" / "gsm8k_train.jsonl", data / "corpora" / "tinyshakespeare.txt"]
    assert exp.eval_tasks == ["bpb", "gsm8k", "long_context"]  # mmlu_stem is not embedded
    assert exp.bpb_text == data / "eval" / "mc" / "lambada_openai.jsonl" and exp.bpb_text.is_file()
    assert str(exp.onpolicy["prompts"]) == str(data / "kd" / "gsm8k_train.jsonl")
    err = capsys.readouterr().err
    assert "bbh_cot_traces.jsonl is not in the embedded default data" in err and "eval task mmlu_stem" in err


def test_a_data_folder_that_lacks_a_file_is_still_an_error(monkeypatch, tmp_path):
    (tmp_path / "kd").mkdir()
    (tmp_path / "kd" / "gsm8k_train.jsonl").write_text("{}\n")
    monkeypatch.setenv("VPMOE_DATA", str(tmp_path))  # a real data folder: a missing file is a mistake
    with pytest.raises(ConfigError, match=r"corpus\[1\].*bbh_cot_traces.jsonl does not exist"):
        load_experiment_config(PRESET)


@pytest.mark.long
def test_cpu_preset_runs_reduced_without_shared(tmp_path, monkeypatch, o200k):
    """The preset end to end on the embedded default, reduced (~2-4 min on 2 busy cores): both stage-1
    variants, one seed, evaluation and the on-policy stage."""
    from megatron_vpmoe.cli import main

    monkeypatch.setenv("VPMOE_DATA", str(embedded_data_dir()))
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(o200k.parent))  # the pruned-o200k variant's ranks
    sets = ["max_stage=1", "seeds=[1]", "train_bytes=6000", "valid_bytes=2000", "tokenizer_train_bytes=6000",
            "eval.limit=2", "onpolicy.steps=2", "onpolicy.prompt_limit=2"]
    assert main(["experiment", "tokenizers", "--config", str(PRESET), "--out", str(tmp_path / "out"),
                 *sum((["--set", s] for s in sets), [])]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "pruned-o200k-8k" in report and "On-policy distillation" in report
