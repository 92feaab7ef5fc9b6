"""Preprocessing memory is bounded by --max-memory: the record limit it implies, and the measured process tree."""

import json
import os
import sys

import numpy
import pytest

from megatron_vpmoe.data.memory_plan import plan
from megatron_vpmoe.tokenizers import train_tokenizer
from megatron_vpmoe.utils.errors import InputError
from megatron_vpmoe.utils.proc_tree import run_measured
from helpers.paths import ROOT as REPO_ROOT

ROOT = str(REPO_ROOT)  # a string: it goes into environment variables


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, shared_data):
    corpus = str(shared_data / "corpora" / "tinyshakespeare.txt")
    return str(train_tokenizer("bpe", [corpus], 600, max_bytes=150_000).save(tmp_path_factory.mktemp("mem") / "b"))


def test_the_record_limit_follows_the_budget_and_the_engine():
    assert plan(512, 8 << 20, {"a": "gigatoken"}) == (8 << 20, "")
    limit, note = plan(512, 8 << 20, {"a": "gigatoken", "b": "tokenizers (cannot load)"})
    assert 1 << 20 < limit < 3 << 20 and "records over" in note and "b: no gigatoken engine" in note
    assert plan(4096, 8 << 20, {"b": "tokenizers"}) == (8 << 20, "")
    with pytest.raises(InputError, match="--max-memory 210 MB is too small for a worker"):
        plan(210, 8 << 20, {"b": "tokenizers"})


def test_a_record_over_the_budget_is_skipped_not_tokenized(tmp_path, tok_dir, monkeypatch, capsys):
    from megatron_vpmoe.data.preprocess import PreprocessOptions, run_preprocess

    monkeypatch.setenv("VPMOE_FAST_TOKENIZER", "0")  # HF tokenizers: ~140 B per input byte
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "small one"}) + "\n" + json.dumps({"text": "word " * (700 << 10)}) + "\n")
    summary = run_preprocess(PreprocessOptions(inputs=[str(src)], output_prefix=str(tmp_path / "o"),
                                               tokenizers={"b": tok_dir}, progress=False, max_memory_mb=400))
    assert summary["documents"] == 1 and summary["skipped"] == {"too_large": 1}
    assert summary["first_skipped"]["too_large"] == [f"{src}:2"] and summary["max_doc_bytes"] < 3_500_000
    assert "records over" in capsys.readouterr().out


def _synthetic(path, mb, seed=0):
    """Distinct documents of random words (a Zipf-like vocabulary), about ``mb`` MB of JSONL."""
    rng = numpy.random.default_rng(seed)
    words = ["".join(rng.choice(list("etaoinshrdlucmfwypvbgkjqxz"), size=n)) for n in rng.integers(1, 12, size=20000)]
    written = 0
    with open(path, "w") as f:
        while written < mb * 1e6:
            ids = numpy.minimum(rng.zipf(1.3, size=(512, 400)) - 1, len(words) - 1).tolist()
            block = "".join('{"text": "' + " ".join([words[i] for i in row]) + '"}\n' for row in ids)
            f.write(block)
            written += len(block)
    return written


def _peak(tmp_path, tok_dir, mb, workers, max_memory):
    src = tmp_path / "big.jsonl"
    size = _synthetic(src, mb)
    cmd = [sys.executable, "-m", "megatron_vpmoe.cli", "preprocess", "--input", str(src), "--output-prefix",
           str(tmp_path / "o"), "--tokenizer", tok_dir, "--workers", str(workers), "--no-progress",
           "--max-memory", str(max_memory)]
    seconds, peak, out = run_measured(cmd, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "encoded with gigatoken" in out.stdout
    return size, peak


def test_process_tree_stays_within_the_budget(tmp_path, tok_dir):
    """Reduced: 24 MB through 2 workers; the whole tree (parent + 2 workers) within 3 budgets."""
    size, peak = _peak(tmp_path, tok_dir, 24, 2, 256)
    assert size > 24e6 and peak < 3 * 256 << 20, peak >> 20


@pytest.mark.long
def test_process_tree_stays_within_the_budget_on_an_input_larger_than_it(tmp_path, tok_dir):
    """One worker (the parent tokenizes), a 256 MB budget, 300 MB of input."""
    size, peak = _peak(tmp_path, tok_dir, 300, 1, 256)
    assert size > 256 << 20 and peak < 256 << 20, peak >> 20
