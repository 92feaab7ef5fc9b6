"""Pinning tests for request bounds at their edges: ``stop`` count, prompt tokens, token ids vs the vocabulary."""

from types import SimpleNamespace

import pytest

from megatron_vpmoe.serve.app import MAX_STOPS, BadRequest, OpenAIServer, _stops
from megatron_vpmoe.serve.limits import ServeLimits


def _server(max_prompt_tokens=4, vocab_size=10):
    """The bound checks read only ``limits`` and ``backend`` (no model, no event loop)."""
    srv = SimpleNamespace(limits=ServeLimits(max_prompt_tokens=max_prompt_tokens),
                          backend=SimpleNamespace(vocab_size=vocab_size, max_token_chars=lambda: 8))
    srv._check_tokens = lambda n, what: OpenAIServer._check_tokens(srv, n, what)
    srv._check_text_length = lambda text, what: OpenAIServer._check_text_length(srv, text, what)
    return srv


srv = _server()


def test_stop_list_of_exactly_max_stops_is_accepted_one_more_refused():
    assert MAX_STOPS == 16
    assert _stops({"stop": [f"s{i}" for i in range(16)]}) == [f"s{i}" for i in range(16)]
    with pytest.raises(BadRequest, match="at most 16"):
        _stops({"stop": [f"s{i}" for i in range(17)]})


def test_prompt_of_exactly_max_prompt_tokens_is_accepted_one_more_refused():
    OpenAIServer._check_tokens(srv, 4, "the prompt")
    assert OpenAIServer._prompt_list(srv, [1, 2, 3, 4]) == [[1, 2, 3, 4]]
    with pytest.raises(BadRequest, match="the prompt of 5 tokens is over this server's 4"):
        OpenAIServer._prompt_list(srv, [1, 2, 3, 4, 5])


def test_token_id_equal_to_the_vocabulary_size_is_refused():
    assert OpenAIServer._prompt_list(srv, [9]) == [[9]]  # the largest id of a 10-token vocabulary
    with pytest.raises(BadRequest, match=r"token id 10 is outside the vocabulary \(10\)"):
        OpenAIServer._prompt_list(srv, [10])
