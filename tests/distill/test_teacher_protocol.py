"""The teacher client's requests and the responses it reads, against vLLM's OpenAI-server protocol.

tests/fixtures/vllm_openai_shapes.json records, from vLLM's pydantic protocol models, the request
fields (with JSON types) of /v1/completions and /v1/chat/completions and one response of each
kind a GPT-OSS teacher returns (chat with ``reasoning`` / older ``reasoning_content``, completions
with ``echo`` + ``logprobs`` and ``max_tokens: 0``). A request field the client starts sending that
vLLM does not define, a type change, or a response field the client stops reading fails here.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from helpers.vllm_shapes import JSON_TYPES as _JSON_TYPES
from helpers.vllm_shapes import SHAPES


class RecordingClient:
    """A TeacherClient stand-in: records each request body, answers with a recorded vLLM response."""

    retries = 0
    base_url = "http://teacher/v1"

    def __init__(self):
        self.sent = []

    async def models(self, retries=0):
        return ["openai/gpt-oss-20b"]

    async def chat(self, body):
        self.sent.append(("chat", body))
        answer = json.loads(json.dumps(SHAPES["chat_response"]))
        answer["choices"] = answer["choices"] * body.get("n", 1)
        return answer

    async def completions(self, body):
        self.sent.append(("completion", body))
        return SHAPES["completion_echo_response"]


def _check_request(kind: str, body: dict) -> None:
    fields = SHAPES[f"{kind}_request_fields"]
    for key, value in body.items():
        assert key in fields, f"{kind} request field {key!r} is not in vLLM's protocol"
        assert _JSON_TYPES[type(value)] in fields[key], f"{kind} request {key}={value!r}: vLLM takes {fields[key]}"


def test_every_client_request_is_a_vllm_request():
    from megatron_vpmoe.distill.generate import GenerateOptions, _Generator
    from megatron_vpmoe.distill.prompts import Prompt
    from megatron_vpmoe.distill.scorers import SCORERS
    from megatron_vpmoe.distill.teacher_probe import FEATURES, probe

    client = RecordingClient()
    messages = [{"role": "user", "content": "What is 2 + 2?"}]

    async def run():
        for kind in SCORERS:
            await SCORERS[kind](client, messages, "4", ["4", "5"], template="harmony", model="openai/gpt-oss-20b")
        await probe(client, list(FEATURES))

    asyncio.run(run())
    for endpoint in ("chat", "completions"):
        gen = _Generator(GenerateOptions("http://teacher", [], "/nonexistent", endpoint=endpoint, seed=1), [], None)
        gen.model = "openai/gpt-oss-20b"
        client.sent.append(("chat" if endpoint == "chat" else "completion",
                            gen._request(Prompt("p", messages, source="f:1", reference="4"), 2, 7)))
    kinds = [k for k, _ in client.sent]
    assert kinds.count("completion") >= 2 and kinds.count("chat") >= 4  # loglik + probe + generate; rank, critique, ...
    for kind, body in client.sent:
        _check_request(kind, body)
    echo = [b for k, b in client.sent if k == "completion" and b.get("echo")]
    assert echo and all(b["max_tokens"] == 0 and b["logprobs"] == 1 for b in echo)  # vLLM: echo without generation


@pytest.mark.parametrize("name,field", [("chat_response", "reasoning"), ("chat_response_older", "reasoning_content")])
def test_vllm_chat_answers_split_reasoning_and_final(name, field):
    from megatron_vpmoe.distill.generate import GenerateOptions, _Generator
    from megatron_vpmoe.distill.prompts import Prompt

    gen = _Generator(GenerateOptions("http://teacher", [], "/nonexistent"), [], None)
    prompt = Prompt("p", [{"role": "user", "content": "2+2?"}], source="f:1", reference="4")
    (rec,) = gen._records(prompt, [0], SHAPES[name], None)
    msg = SHAPES[name]["choices"][0]["message"]
    assert (rec["reasoning"], rec["final"]) == (msg[field], msg["content"]) == ("2 plus 2 is 4.", "The answer is 4.")
    assert rec["teacher_model"] == "openai/gpt-oss-20b"


def test_vllm_echo_logprobs_score_the_completion():
    from megatron_vpmoe.distill.scorers import completion_logprob

    answer = SHAPES["completion_echo_response"]
    text = answer["choices"][0]["text"]
    assert completion_logprob(answer, prompt_chars=len(text) - 1) == -0.75  # the completion "4" only
    assert completion_logprob(answer, prompt_chars=text.index("<|channel|>")) == pytest.approx(-0.1 - 0.2 - 0.05 - 0.75)


def test_index_pick_equals_the_char_offset_pick():
    """A token-id prompt's completion is picked by token index; on benign text that is the same
    tokens the character-offset pick of a text prompt chose, for every split point."""
    from megatron_vpmoe.distill.scorers import completion_logprob
    from megatron_vpmoe.distill.teacher_client import MalformedResponse

    answer = SHAPES["completion_echo_response"]
    offsets = answer["choices"][0]["logprobs"]["text_offset"]
    n = len(offsets)
    for i in range(1, n):
        by_char = completion_logprob(answer, prompt_chars=offsets[i])
        assert completion_logprob(answer, prompt_tokens=i, total_tokens=n) == by_char
    assert completion_logprob(answer, prompt_tokens=n - 1) == -0.75
    with pytest.raises(MalformedResponse):  # the teacher echoed another number of tokens than sent
        completion_logprob(answer, prompt_tokens=n - 1, total_tokens=n + 1)
    with pytest.raises(MalformedResponse):  # nothing after the prompt
        completion_logprob(answer, prompt_tokens=n, total_tokens=n)


class EchoClient:
    """A TeacherClient stand-in answering the echo probe with the given prompt log-probs."""

    base_url = "http://teacher/v1"

    def __init__(self, values):
        self.values = values

    async def models(self, retries=0):
        return ["m"]

    async def completions(self, body):
        n = len(self.values)
        return {"choices": [{"text": body["prompt"], "finish_reason": "length", "logprobs": {
            "tokens": ["t"] * n, "token_logprobs": self.values, "text_offset": list(range(n)),
            "top_logprobs": None}}]}


@pytest.mark.parametrize("values, ok", [
    ([None, -1.5, -0.25, -0.5], True),  # vLLM / vpmoe serve: the first prompt token has no log-prob
    ([-0.1, -1.5, -0.25, -0.5], True),  # a server that scores the first token too
    ([None, None, -0.25, -0.5], False),  # the second prompt token without one
    ([None, -1.5, None, -0.5], False),  # a later prompt token without one: not usable for loglik
    ([None, None, None, None], False),  # transformers serve: fields present, values not
    ([None], False),
])
def test_the_echo_probe_skips_only_the_first_prompt_log_prob(values, ok):
    """Pins issue 33's planted bug: a probe that reads the first (always None) entry calls
    every vLLM teacher unable to score, and one that skips more accepts a broken teacher."""
    from megatron_vpmoe.distill.teacher_probe import probe

    caps = asyncio.run(probe(EchoClient(values), ["echo_logprobs"]))
    assert caps.features == {"echo_logprobs": ok}, caps.why
    assert ("loglik" in caps.scorers()) == ok
