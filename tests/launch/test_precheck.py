"""launch.precheck: what the trainer refuses at start without a model is refused before any rank starts, once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers.paths import ROOT
from megatron_vpmoe.config import load_config
from megatron_vpmoe.launch.precheck import check_before_launch
from megatron_vpmoe.utils.errors import ConfigError, InputError

CONFIG = str(ROOT / "examples" / "configs" / "tiny-cpu.yaml")
MOCK = ["data.mock=true", "data.tokenizer=null"]


def test_batch_not_divisible_by_micro_batch_times_data_parallel():
    cfg = load_config(CONFIG, [*MOCK, "train.global_batch_size=12", "train.micro_batch_size=4"])
    assert check_before_launch(cfg, 1) == 1
    with pytest.raises(ConfigError, match=r"train.global_batch_size.*\(8\)"):
        check_before_launch(cfg, 2)


def test_layout_that_does_not_fit_the_ranks():
    with pytest.raises(ConfigError, match="parallel"):
        check_before_launch(load_config(CONFIG, [*MOCK, "parallel.tensor=2"]), 3)


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    from megatron_vpmoe.tokenizers import train_tokenizer
    from helpers.train_support import SHAKESPEARE

    train_tokenizer("bpe", [str(SHAKESPEARE)], 1024, max_bytes=100_000).save(tmp_path / "tok")
    ok = load_config(CONFIG, ["data.mock=true", f"data.tokenizer={tmp_path}/tok", "model.vocab_size=1024"])
    check_before_launch(ok, 2)
    small = load_config(CONFIG, ["data.mock=true", f"data.tokenizer={tmp_path}/tok", "model.vocab_size=512"])
    with pytest.raises(ConfigError, match="model.vocab_size.*1024 tokens, more than model.vocab_size 512"):
        check_before_launch(small, 2)
    check_before_launch(small, 2, check_paths=False)  # paths that exist only where the job runs: not read


def test_missing_shards_named_by_their_blend_entry(tmp_path):
    cfg = load_config(CONFIG, ["data.tokenizer=null", f"data.blend=[[1.0, {tmp_path}/nothing]]"])
    with pytest.raises(InputError, match=r"data.blend\[0\]"):
        check_before_launch(cfg, 2)


def test_launch_local_reports_a_batch_error_once_without_starting_ranks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "megatron_vpmoe.cli", "launch", "local", "--nproc", "2", "--config",
                          CONFIG, "--set", "data.mock=true", "--set", "data.tokenizer=null",
                          "--set", f"run.dir={tmp_path}", "--set", "train.global_batch_size=12"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "train.global_batch_size" in out.stderr, out.stderr
    assert "[vpmoe]" not in out.stdout  # torchrun never started
