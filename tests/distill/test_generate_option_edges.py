"""Pinning tests for ``distill generate``'s flag and filter edges: ``--top-p`` is open at 0, ``--max-chars`` inclusive."""

import pytest

from megatron_vpmoe.distill.generate import GenerateOptions, check_options, rejection_reason
from megatron_vpmoe.distill.prompts import Prompt
from megatron_vpmoe.utils.errors import InputError


def _opts(**kw):
    return GenerateOptions(teacher_url="http://localhost:1", prompt_files=[], out_dir="unused", **kw)


def test_top_p_zero_is_refused_and_the_smallest_positive_accepted():
    with pytest.raises(InputError, match=r"--top-p must be a finite number > 0.0 and <= 1.0, got 0.0"):
        check_options(_opts(top_p=0.0))
    check_options(_opts(top_p=1e-9))
    check_options(_opts(top_p=1.0))


def test_max_chars_keeps_a_sample_of_exactly_that_size():
    prompt = Prompt(id="p", messages=[], source="f:1")
    rec = {"finish_reason": "stop", "reasoning": "abc", "final": "de", "prompt_id": "p"}  # 5 characters
    assert rejection_reason(rec, prompt, _opts(max_chars=5, dedupe=False), set()) is None
    assert rejection_reason(rec, prompt, _opts(max_chars=4, dedupe=False), set()) == "too_long"
