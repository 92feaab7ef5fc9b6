"""The console a person sees: known third-party notices filtered (utils/notices.py), other ranks
silent unless --verbose, no progress-bar carriage returns in logs, and a weights-only start
says "initialised from" rather than "resumed ... at step 0"."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers.paths import ROOT

pytestmark = pytest.mark.e2e

# the notices utils/notices.py filters, as megatron-core, transformers and DCP print them
KNOWN_NOTICES = ("Transformer Engine and Apex are not installed", "path_to_cache is None",
                 "`loss_type=None`", "torch.distributed is disabled")
# what a 2-process run printed before (issue 32): megatron-core's blend note once per split, torch's
# deprecated all-to-all on EP, megatron-core's CUDA advice on CPU, torchrun's own warnings
NOISE = ("Building a BlendedDataset for a single MegatronDataset", "all_to_all_single is deprecated",
         "CUDA_DEVICE_MAX_CONNECTIONS", "FutureWarning", "torch.distributed.elastic", "to instantiate a model of type")

TINY = ["model.vocab_size=512", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_query_groups=2", "model.kv_channels=16", "model.ffn_hidden_size=64",
        "model.moe_ffn_hidden_size=32", "model.moe_shared_expert_intermediate_size=32", "data.seq_length=32",
        "data.mock=true", "data.tokenizer=null", "train.global_batch_size=4", "train.micro_batch_size=1",
        "train.schedule.warmup_steps=1", "train.eval_interval=0", "log.interval=1"]


def _vpmoe(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VPMOE_VERBOSE"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "megatron_vpmoe.cli", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # pipes: not a terminal, as in CI
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout, out.stderr


def _sets(*items):
    return [a for item in (*TINY, *items) for a in ("--set", item)]


def _tiny_shards(tmp_path):
    """A 1024-token BPE and Shakespeare shards: real data, as the quickstart trains on."""
    from helpers.train_support import SHAKESPEARE

    _vpmoe(["tokenizer", "train", "--kind", "bpe", "--vocab-size", "1024", "--input", str(SHAKESPEARE),
            "--max-bytes", "300000", "--output", str(tmp_path / "tok")], tmp_path)
    _vpmoe(["preprocess", "--input", str(SHAKESPEARE), "--txt-blocks", "--output-prefix", str(tmp_path / "s" / "c"),
            "--tokenizer", str(tmp_path / "tok")], tmp_path)
    return [f"data.tokenizer={tmp_path}/tok", f"data.blend=[[1.0, {tmp_path}/s/c.tok_text_document]]",
            "data.mock=false", "model.vocab_size=1024"]


def test_two_rank_train_console_is_rank0_only_without_notices_then_initialised_from(tmp_path):
    config = str(ROOT / "examples" / "configs" / "tiny-cpu.yaml")
    data = _tiny_shards(tmp_path)  # quickstart-style: a blend of one prefix, expert parallel over the 2 ranks
    out, err = _vpmoe(["launch", "local", "--nproc", "2", "--config", config,
                       *_sets(f"run.dir={tmp_path}/pre", "train.steps=3", "parallel.expert=2", *data)], tmp_path)
    console = out + err
    for notice in KNOWN_NOTICES + NOISE:
        assert notice not in console, notice
    assert "Warning" not in err, err  # nothing else from either rank's warnings
    assert "\r" not in console  # no progress bar in a log: plain step lines instead
    assert [line.split(" loss")[0] for line in out.splitlines() if line.startswith("step ")] == \
        ["step 1/3", "step 2/3", "step 3/3"]  # once each: rank 1 prints nothing
    assert out.count("trained steps 0..3") == 1

    # phase 1 from the pretrained weights with a fresh optimizer: one process (DCP without a group)
    out, err = _vpmoe(["train", "--config", config,
                       *_sets(f"run.dir={tmp_path}/phase1", "train.steps=1", f"checkpoint.load={tmp_path}/pre/checkpoints",
                              "checkpoint.load_optimizer=false", *data)], tmp_path)
    assert f"initialised from {tmp_path}/pre/checkpoints" in out and "resumed" not in out, out
    for notice in KNOWN_NOTICES + NOISE:
        assert notice not in out + err, notice

    # the converted model evaluated: neither transformers' model-type warning nor its weight-loading bar
    _vpmoe(["convert", "to-hf", f"{tmp_path}/phase1/checkpoints", str(tmp_path / "hf"), "--tokenizer",
            str(tmp_path / "tok")], tmp_path)
    (tmp_path / "held.txt").write_text("To be, or not to be, that is the question.\n" * 20)
    out, err = _vpmoe(["eval", str(tmp_path / "hf"), "--tasks", "bpb", "--bpb-text", str(tmp_path / "held.txt"),
                       "--out", str(tmp_path / "eval")], tmp_path)
    for notice in KNOWN_NOTICES + NOISE:
        assert notice not in out + err, notice
    assert "\r" not in out + err


def test_other_ranks_are_silent_unless_verbose():
    probe = ("import sys, warnings; from megatron_vpmoe.utils.notices import install; install(rank=int(sys.argv[1])); "
             "print('rank says hello', flush=True); warnings.warn('Transformer Engine and Apex are not installed'); "
             "warnings.warn('a real warning'); print('to stderr', file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k != "VPMOE_VERBOSE"}
    env["PYTHONPATH"] = str(ROOT)

    def run(rank, **extra):
        out = subprocess.run([sys.executable, "-c", probe, str(rank)], env=dict(env, **extra), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout, out.stderr

    out, err = run(0)
    assert "rank says hello" in out and "a real warning" in err and "Apex" not in err and "to stderr" in err
    out, err = run(1)
    assert out == "" and "warning" not in err and "to stderr" in err  # errors of any rank still show
    out, err = run(1, VPMOE_VERBOSE="1")
    assert "rank says hello" in out and "Apex" in err and "a real warning" in err


def _terminal(args, tmp_path):
    from helpers.terminal import Terminal

    env = {k: v for k, v in os.environ.items() if k not in ("VPMOE_VERBOSE", "COLUMNS")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return Terminal([sys.executable, "-m", "megatron_vpmoe.cli", *args], env, str(tmp_path))


def _bar_with_loss(text: str) -> bool:
    """A refresh of the train bar (between carriage returns) showing step, loss and tokens/s."""
    return any("train:" in seg and "/" in seg and "loss=" in seg and "tok_s=" in seg for seg in text.split("\r"))


def test_a_terminal_shows_the_bar_with_loss_and_tokens_per_s_from_the_first_step(tmp_path):
    config = str(ROOT / "examples" / "configs" / "tiny-cpu.yaml")
    # log.interval=10 (tiny-cpu's): the first step is shown anyway; the terminal reports 0 columns
    term = _terminal(["train", "--config", config, *_sets(f"run.dir={tmp_path}/r", "train.steps=6",
                                                          "log.interval=10")], tmp_path)
    seen = term.wait_for(lambda text: _bar_with_loss(text) or "trained steps" in text, timeout=240)
    before_end = term.text.split("trained steps")[0]
    assert term.finish(timeout=120) == 0, term.text[-3000:]
    assert seen and _bar_with_loss(before_end), before_end[-3000:]
    first = next(seg for seg in before_end.split("\r") if _bar_with_loss(seg))
    assert " 1/6 " in first, first  # loss and tokens/s after the first step, before the run ends
