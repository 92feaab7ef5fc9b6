"""The inference layer on an in-memory VPMoE: KV-cached generation reports the log-probs teacher
forcing gives, stops at stop ids, honours a seed and a cancellation, and batching leaves scores alone."""

from __future__ import annotations

import threading

import pytest
import torch

from megatron_vpmoe.inference.backend import Cancelled, SampleParams
from megatron_vpmoe.inference.native import NativeBackend
from megatron_vpmoe.model import VpmoeModel
from helpers.model_configs import tiny_model_cfg as tiny_cfg


@pytest.fixture(scope="module")
def backend():
    torch.manual_seed(3)
    return NativeBackend(model=VpmoeModel(tiny_cfg()), max_length=64, batch_size=2)


def test_generated_logprobs_are_the_teacher_forced_ones(backend):
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5]]
    got = backend.generate(prompts, SampleParams(6, temperature=1.0, seed=11))
    again = backend.generate(prompts, SampleParams(6, temperature=1.0, seed=11))
    assert [s.tokens for s in got] == [s.tokens for s in again]  # the seed fixes the samples
    for p, s in zip(prompts, got):
        assert len(s.tokens) == 6 and s.finish_reason == "length"
        (lp, _), = backend.score([p + s.tokens], [len(p)])
        assert s.logprobs == pytest.approx(lp.tolist(), abs=1e-5)


def test_stop_ids_and_batching(backend):
    greedy = backend.generate([[9, 8, 7]], SampleParams(8, temperature=0.0))[0].tokens
    stop = greedy[3]
    cut = backend.generate([[9, 8, 7]], SampleParams(8, temperature=0.0, stop_ids=(stop,)))[0]
    assert cut.tokens == greedy[: greedy.index(stop)] and cut.finish_reason == "stop"
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    batched = backend.score(seqs, [1, 1, 2])
    for seq, start, (lp, greedy_flags) in zip(seqs, [1, 1, 2], batched):
        (alone, flags), = backend.score([seq], [start])
        assert torch.allclose(lp, alone, atol=1e-5) and torch.equal(greedy_flags, flags)


def test_cancelled_call_stops(backend):
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Cancelled):
        backend.generate([[1, 2, 3]], SampleParams(4), cancelled)
    with pytest.raises(Cancelled):
        backend.score([[1, 2, 3]], [1], cancelled)
    assert backend.generate([[1, 2, 3]], SampleParams(2, temperature=0.0))[0].tokens  # the hook is gone
