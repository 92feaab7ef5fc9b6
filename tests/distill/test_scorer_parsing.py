"""Pinning tests for the rank and critique scorers' parsing of teacher answers."""

import pytest

from megatron_vpmoe.distill.scorers import parse_critique, parse_ranking


def test_parse_ranking_ignores_numbers_past_k():
    assert parse_ranking("3 > 1 > 2 > 4", 3) == [2, 0, 1]
    assert parse_ranking("4 > 2", 3) == [1, 0, 2]
    assert parse_ranking("0 > 4", 3) is None


def test_parse_critique_takes_the_last_number():
    assert parse_critique("Point 1 is fine, point 2 is weak; overall 7") == pytest.approx(0.7)
    assert parse_critique("Score: 3 at first, but on reflection Score: 8") == pytest.approx(0.8)
    assert parse_critique("It rates 4 out of 40 tries; 11") == pytest.approx(0.4)
