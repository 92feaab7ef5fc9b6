"""Pinning tests for the request field ``n`` at its bounds (no server: the parsing function)."""

import pytest

from megatron_vpmoe.serve.app import BadRequest, _sample_params
from megatron_vpmoe.serve.limits import ServeLimits


@pytest.mark.parametrize("n", [0, -1, 129])
def test_n_outside_1_to_128_is_refused(n):
    with pytest.raises(BadRequest, match="'n' must be between 1 and 128"):
        _sample_params({"n": n}, (), 16, ServeLimits())


def test_n_at_its_bounds_is_accepted():
    assert _sample_params({"n": 1}, (), 16, ServeLimits())[1] == 1
    assert _sample_params({"n": 128, "max_tokens": 2}, (), 16, ServeLimits())[1] == 128
