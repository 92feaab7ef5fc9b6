"""ServeLimits' validation at its boundaries: every bound must be an integer >= 1 (0, negatives,
floats and None refused, naming the field); 1 and the defaults are accepted."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from megatron_vpmoe.serve.limits import ServeLimits

NAMES = [f.name for f in fields(ServeLimits)]


def test_defaults_are_valid_and_documented_values():
    limits = ServeLimits()
    limits.check()
    assert (limits.max_request_bytes, limits.max_prompt_tokens, limits.max_request_tokens, limits.max_pending) == \
        (1 << 20, 16384, 32768, 64)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [0, -1, -(1 << 40), 1.5, 2.0, None, "8"])
def test_each_bound_refuses_non_positive_and_non_integers(name, value):
    with pytest.raises(ValueError, match=name):
        replace(ServeLimits(), **{name: value}).check()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [1, 2, 1 << 40])
def test_each_bound_accepts_positive_integers(name, value):
    replace(ServeLimits(), **{name: value}).check()


def test_all_ones_is_the_smallest_valid_server():
    ServeLimits(1, 1, 1, 1).check()
    for i in range(4):
        values = [1, 1, 1, 1]
        values[i] = 0
        with pytest.raises(ValueError, match=NAMES[i]):
            ServeLimits(*values).check()
