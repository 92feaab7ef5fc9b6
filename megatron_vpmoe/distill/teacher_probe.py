"""Capability probe of an OpenAI-compatible teacher: which features it serves, so which scorers work.

Servers differ: ``vpmoe serve``, vLLM and SGLang return prompt log-probs from ``/v1/completions``
with ``echo`` + ``logprobs``; ``transformers serve`` accepts those fields but ignores them, and
ignores ``n``. The probe asks ``/v1/models`` and then sends one tiny request per feature the run
needs, judging each by the answer's shape (never by the server's name):

* ``chat``          ``/v1/chat/completions`` answers with ``choices[0].message`` (content/reasoning);
* ``n``             the same with ``n: 2`` returns two choices (else one request per sample);
* ``echo_logprobs`` ``/v1/completions`` with ``echo``, ``logprobs: 1``, ``max_tokens: 0`` returns the
                    prompt's text and one log-prob per token (the ``loglik`` scorer's request).

:func:`require` refuses, before any rollout, a scorer whose feature is missing (exit 2).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Optional

from megatron_vpmoe.distill.teacher_client import MalformedResponse, TeacherClient, TeacherUnavailable
from megatron_vpmoe.utils.errors import VpmoeError

FEATURES = {
    "chat": "/v1/chat/completions with a message in choices[0].message",
    "n": "/v1/chat/completions returning n > 1 choices",
    "echo_logprobs": "/v1/completions with echo + logprobs + max_tokens 0 (prompt log-probs)",
}
# what each on-policy scorer sends (distill.scorers); on-policy runs probe all of these
SCORER_FEATURES = ("chat", "echo_logprobs")
SCORER_NEEDS = {"loglik": ("echo_logprobs",), "rank": ("chat",), "critique": ("chat",), "verify": ()}
_PROBE_TEXT = "The capital of France is Paris."
PROBE_CHAT = "Say hi."  # the user message of the chat probes


class TeacherCapabilityError(VpmoeError):
    """The teacher cannot serve what the configuration asks of it."""

    exit_code = 2


@dataclass
class TeacherCapabilities:
    url: str
    model: Optional[str]
    features: dict = field(default_factory=dict)  # name -> True / False
    why: dict = field(default_factory=dict)  # name -> why a feature is missing
    reasoning_field: Optional[str] = None  # "reasoning_content" | "reasoning" | None (as seen)

    def missing(self, scorer: str) -> list:
        return [f for f in SCORER_NEEDS[scorer] if not self.features.get(f)]

    def scorers(self) -> list:
        return [s for s in SCORER_NEEDS if not self.missing(s)]

    def line(self) -> str:
        """One line: the server, its features and the scorers it supports."""
        feats = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in self.features.items())
        lacking = [s for s in SCORER_NEEDS if s not in self.scorers()]
        tail = f"; not {', '.join(lacking)}" if lacking else ""
        return (f"teacher {self.url} model {self.model}: {feats}; reasoning field "
                f"{self.reasoning_field or 'none'} -> scorers {', '.join(self.scorers())}{tail}")


async def _chat_probe(client: TeacherClient, model, n: int) -> dict:
    return await client.chat({"model": model, "messages": [{"role": "user", "content": PROBE_CHAT}],
                              "max_tokens": 4, "temperature": 0, "n": n})


async def _echo_probe(client: TeacherClient, model) -> Optional[str]:
    """None when the answer carries the prompt's log-probs, else why not."""
    data = await client.completions({"model": model, "prompt": _PROBE_TEXT, "max_tokens": 0, "echo": True,
                                     "logprobs": 1, "temperature": 0})
    choice = data["choices"][0]
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return "the answer has no logprobs"
    values, offsets = lp.get("token_logprobs"), lp.get("text_offset")
    if not isinstance(values, list) or not isinstance(offsets, list) or len(values) != len(offsets) or len(values) < 2:
        return "the answer's logprobs have no per-token token_logprobs/text_offset"
    if not str(choice.get("text", "")).startswith(_PROBE_TEXT):
        return "the answer does not echo the prompt"
    if not all(isinstance(v, (int, float)) for v in values[1:]):
        return "the prompt tokens have no log-probs"
    return None


async def probe(client: TeacherClient, features, model: Optional[str] = None) -> TeacherCapabilities:
    """Ask ``/v1/models`` then one request per feature in ``features`` (see :data:`FEATURES`)."""
    try:
        models = await client.models(retries=1)
    except (TeacherUnavailable, MalformedResponse) as err:
        raise TeacherCapabilityError(f"teacher at {client.base_url} is not reachable or not an "
                                     f"OpenAI-compatible server: {err}") from None
    if model is None:
        model = models[0] if models else None
    caps = TeacherCapabilities(client.base_url, model)
    for name in features:
        try:
            if name == "echo_logprobs":
                why = await _echo_probe(client, model)
            else:
                data = await _chat_probe(client, model, 2 if name == "n" else 1)
                why = None if name == "chat" or len(data["choices"]) == 2 else (
                    f"asked for 2 choices, got {len(data['choices'])}")
                caps.features.setdefault("chat", True)  # any chat answer proves chat
                msg = data["choices"][0]["message"]
                for key in ("reasoning_content", "reasoning"):
                    if key in msg and caps.reasoning_field is None:
                        caps.reasoning_field = key
        except (MalformedResponse, TeacherUnavailable) as err:
            why = str(err).splitlines()[0][:160]
        caps.features[name] = why is None
        if why is not None:
            caps.why[name] = why
    return caps


def require(caps: TeacherCapabilities, scorers) -> None:
    """Raise (exit 2) naming the first configured scorer whose feature the teacher lacks."""
    for s in scorers:
        for feat in caps.missing(s):
            raise TeacherCapabilityError(
                f"scorer '{s}' needs {FEATURES[feat]}, which the teacher at {caps.url} does not serve "
                f"({caps.why.get(feat, 'missing')}); it supports: {', '.join(caps.scorers())}")


def probe_teacher(url: str, features, *, model: Optional[str] = None, timeout_s: float = 60.0) -> TeacherCapabilities:
    """:func:`probe` in its own event loop and client."""
    async def run():
        async with TeacherClient(url, timeout_s=timeout_s, retries=0) as client:
            return await probe(client, features, model)

    return asyncio.run(run())
