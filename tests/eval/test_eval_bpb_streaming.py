"""Bits per byte scored in large batches of windows, keeping per-window sums only, equals the old per-window, per-token scoring."""

import math

import pytest
import torch

from megatron_vpmoe.config import load_config
from megatron_vpmoe.eval import requests as R
from megatron_vpmoe.inference.native import NativeBackend
from megatron_vpmoe.model import VpmoeModel
from megatron_vpmoe.tokenizers.train import train_bpe
from helpers.paths import ROOT


@pytest.fixture(scope="module")
def backend(shared_data):
    text = (shared_data / "corpora" / "tinyshakespeare.txt").read_text()[:40_000]
    tok = train_bpe([text], 400)
    cfg = load_config(ROOT / "examples" / "configs" / "tiny-cpu.yaml",
                      ["model.vocab_size=512", "model.num_layers=2", "data.tokenizer=null"])
    torch.manual_seed(0)
    b = NativeBackend(model=VpmoeModel(cfg.model), tokenizer=tok.to_hf(), max_length=32, batch_size=4)
    b.text = text[-6000:]
    return b


def test_batched_sums_equal_the_old_per_window_scoring(backend):
    ids = backend.encode(backend.text)
    windows = R.document_windows(backend, ids)
    assert len(windows) > 20 and len(windows[-1]) < len(windows[0])  # a short last window is padded in a batch
    assert [t for w in windows for t in w[1:]] == ids  # every token is a target exactly once
    old = float(-torch.cat([lp for lp, _ in backend.score(windows, [1] * len(windows))]).double().sum())
    seen = []
    new = R.document_nll(backend, windows, progress=seen.append)
    assert R.score_rows(backend, 33) == 4096 // 33 and sum(seen) == len(windows) and len(seen) == 1
    assert new == pytest.approx(old, rel=1e-6)
    for rows in (1, 3, 7):  # any batching gives the same sums
        sums = backend.nll_sums(windows, [1] * len(windows), rows=rows)
        assert math.fsum(sums) == pytest.approx(old, rel=1e-6)


def test_run_bits_per_byte_uses_the_streamed_sums(backend, tmp_path):
    from megatron_vpmoe.eval.tasks import run_bits_per_byte
    from megatron_vpmoe.training.loss import bits_per_byte

    path = tmp_path / "heldout.txt"
    path.write_text(backend.text)
    got = run_bits_per_byte(backend, path, None, progress=False)
    windows = R.document_windows(backend, backend.encode(backend.text))
    old = float(-torch.cat([lp for lp, _ in backend.score(windows, [1] * len(windows))]).double().sum())
    assert got["bpb"] == pytest.approx(bits_per_byte(old, len(backend.text.encode())), rel=1e-6)


def test_one_forward_is_bounded_by_the_logits_budget(backend, monkeypatch):
    monkeypatch.setattr(backend, "vocab_size", 201_088)  # an o200k-sized head: one 2048-token window a forward
    assert R.score_rows(backend, 2048) == 1
    assert R.score_rows(backend, 128) == R.SCORE_LOGITS_BYTES // (4 * 128 * 201_088)


def test_eval_threads_flag_is_checked(capsys):
    from megatron_vpmoe.cli import main

    assert main(["eval", "nowhere", "--tasks", "bpb", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
