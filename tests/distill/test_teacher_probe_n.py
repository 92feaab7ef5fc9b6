"""Pinning tests for the teacher probe's judgement of the ``n`` feature (a fake client, no server)."""

import asyncio

from megatron_vpmoe.distill.teacher_probe import probe


class _Client:
    base_url = "http://fake/v1"

    def __init__(self, choices):
        self.choices = choices

    async def models(self, retries=None):
        return ["m"]

    async def chat(self, body):
        return {"choices": [{"message": {"role": "assistant", "content": "hi"}}] * self.choices}


def test_one_choice_for_n_2_means_no_n_feature():
    caps = asyncio.run(probe(_Client(1), ["chat", "n"]))
    assert caps.features == {"chat": True, "n": False}
    assert caps.why["n"] == "asked for 2 choices, got 1"
    caps = asyncio.run(probe(_Client(2), ["n"]))
    assert caps.features == {"chat": True, "n": True} and "n" not in caps.why
