"""The log-prob helper scores in cache-sized chunks of positions: the same values as one log-softmax, whatever the chunk."""

import pytest
import torch

from megatron_vpmoe.inference import logprobs


@pytest.mark.parametrize("chunk_positions", [1, 3, 1000])
def test_chunked_logprobs_equal_one_log_softmax(monkeypatch, chunk_positions):
    torch.manual_seed(0)
    vocab = 37
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * vocab * chunk_positions)
    logits = torch.randn(3, 11, vocab) * 4
    targets = torch.randint(0, vocab, (3, 11))
    want = torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got = logprobs.token_logprobs(logits, targets)
    assert got.dtype == torch.float32 and got.shape == (3, 11)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=0)
    # bf16 logits are scored in float32; a 1-D row and a single position keep their shapes
    assert torch.allclose(logprobs.token_logprobs(logits.bfloat16(), targets).double(),
                          torch.log_softmax(logits.bfloat16().double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1),
                          atol=1e-5, rtol=0)
    assert logprobs.token_logprobs(logits[0], targets[0]).shape == (11,)
    assert logprobs.token_logprobs(logits[0, 0], targets[0, 0]).shape == ()


def test_negative_targets_are_not_scored(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * 5 * 2)
    logits = torch.randn(2, 4, 5)
    targets = torch.tensor([[1, 2, -1, -1], [0, -1, 4, -1]])
    got = logprobs.token_logprobs(logits, targets)
    assert (got[targets < 0] == 0).all() and (got[targets >= 0] < 0).all()
    whole = logprobs.token_logprobs(logits, targets.clamp_min(0))
    assert torch.equal(got[targets >= 0], whole[targets >= 0])
