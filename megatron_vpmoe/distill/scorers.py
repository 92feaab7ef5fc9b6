"""String-level teacher scorers for on-policy distillation (no token alignment needed).

Each scorer takes one prompt's group - the prompt messages, its reference answer (or None) and
the k decoded student completions - and returns k scores (None = this sample could not be
scored: timeout after retries, malformed answer), or ``NOT_APPLICABLE`` when the scorer has
nothing to say about the prompt (a verifiable reward without a reference).

* ``loglik``   teacher log-likelihood of the completion given the prompt, per UTF-8 byte, from
               ``/v1/completions`` with ``echo`` + ``logprobs`` and ``max_tokens: 0``; the prompt
               is sent as the teacher's token ids (contents as plain text), see :func:`score_loglik`;
* ``rank``     the teacher ranks the k samples listwise; parsed robustly; score in [0, 1];
* ``critique`` the teacher rates one sample against a rubric (``Score: N`` of 10) -> N / 10;
* ``verify``   1 if the completion's answer equals the reference (GSM8K), else 0.

:func:`combine` mixes them with weights into one score per sample.
"""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Optional

from megatron_vpmoe.utils.answers import answer_matches
from megatron_vpmoe.distill.policy_loss import per_byte
from megatron_vpmoe.distill.teacher_client import MalformedResponse, TeacherClient, TeacherUnavailable
from megatron_vpmoe.utils.errors import ConfigError

NOT_APPLICABLE = "n/a"


def teacher_prompt_text(messages: list, template: str) -> str:
    """The text the teacher sees before a completion it scores by log-likelihood."""
    if template == "harmony":
        from megatron_vpmoe.data.chat_format import render_harmony_prompt

        return render_harmony_prompt(messages) + "<|channel|>final<|message|>"
    if template == "plain":
        return "\n\n".join(m["content"] for m in messages) + "\n"
    raise ValueError(f"unknown teacher prompt template {template!r} (harmony | plain)")


@functools.lru_cache(maxsize=4)
def teacher_tokenizer(template: str, path: Optional[str] = None):
    """The tokenizer that turns the loglik prompt into the teacher's token ids: the ``transformers``
    tokenizer at ``path``; else GPT-OSS's o200k Harmony for ``harmony``; else None (``plain``
    with an unknown teacher tokenizer: the prompt is sent as text)."""
    if path:
        from pathlib import Path

        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise ConfigError(f"{path} is not a directory (a Hugging Face tokenizer's)",
                              key="distill.onpolicy.teacher_tokenizer")
        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load a tokenizer from {path} "
                              f"({str(err).splitlines()[0] if str(err) else type(err).__name__})",
                              key="distill.onpolicy.teacher_tokenizer") from None
    if template == "harmony":
        from megatron_vpmoe.data.chat import HarmonyEncoder

        return HarmonyEncoder()
    return None


def teacher_prompt_ids(tokenizer, messages: list, template: str) -> list:
    """:func:`teacher_prompt_text` as the teacher's token ids: the template's own markers are
    special tokens, message contents plain text (a prompt file's ``<|end|><|start|>system`` is
    those characters, never a forged turn)."""
    from megatron_vpmoe.data.chat import encode_pieces, render_pieces

    return encode_pieces(tokenizer, render_pieces(lambda msgs: teacher_prompt_text(msgs, template), messages))


def completion_logprob(data: dict, *, prompt_chars: Optional[int] = None,
                       prompt_tokens: Optional[int] = None, total_tokens: Optional[int] = None) -> float:
    """Sum of the echoed log-probs of the completion: the tokens at index ``prompt_tokens`` and
    after (a token-id prompt of ``total_tokens`` ids), else those whose text starts at or after
    character ``prompt_chars`` (a text prompt)."""
    try:
        lp = data["choices"][0]["logprobs"]
        values = lp["token_logprobs"]
        offsets = lp["text_offset"] if prompt_tokens is None else None
    except (KeyError, IndexError, TypeError) as err:
        raise MalformedResponse(f"echo answer without logprobs ({err})") from err
    if not isinstance(values, list):
        raise MalformedResponse("token_logprobs is not a list")
    if prompt_tokens is not None:
        if total_tokens is not None and len(values) != total_tokens:
            raise MalformedResponse(f"{len(values)} echoed log-probs for {total_tokens} prompt tokens")
        picked = values[prompt_tokens:]
    else:
        if not isinstance(offsets, list) or len(offsets) != len(values):
            raise MalformedResponse("text_offset and token_logprobs differ in length")
        picked = [v for o, v in zip(offsets, values) if isinstance(o, int) and o >= prompt_chars]
    if not picked or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in picked):
        raise MalformedResponse("no log-probs for the completion tokens")
    return float(sum(picked))


async def _guard(make, retries: int):
    """``await make()``; a malformed teacher answer is asked again up to ``retries`` times
    (transient HTTP failures are already retried by the client); None when it never worked."""
    for _ in range(retries + 1):
        try:
            return await make()
        except MalformedResponse:
            continue
        except (TeacherUnavailable, ValueError):
            return None
    return None


async def loglik_one(client: TeacherClient, prompt: str, prompt_ids: Optional[list], tokenizer, text: str,
                     model: Optional[str] = None) -> float:
    """One completion's teacher log-likelihood per UTF-8 byte (raises on a bad answer): sent as
    ``prompt_ids`` + the completion's plain-text ids, or (no tokenizer) as ``prompt + text``."""
    if not text:
        raise ValueError("empty completion")
    request = {"model": model, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    if prompt_ids is None:
        data = await client.completions({**request, "prompt": prompt + text})
        return per_byte(completion_logprob(data, prompt_chars=len(prompt)), text)
    ids = prompt_ids + tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    data = await client.completions({**request, "prompt": ids})
    return per_byte(completion_logprob(data, prompt_tokens=len(prompt_ids), total_tokens=len(ids)), text)


async def score_loglik(client: TeacherClient, messages, reference, completions, *,
                       template: str = "harmony", model: Optional[str] = None, tokenizer=None) -> list:
    """``tokenizer`` (:func:`teacher_tokenizer`; default GPT-OSS's for ``harmony``): the prompt
    and each completion go to the teacher as its token ids, contents and completions encoded as
    plain text; ``plain`` with no tokenizer sends text."""
    if tokenizer is None and template == "harmony":
        tokenizer = teacher_tokenizer(template)
    prompt = teacher_prompt_text(messages, template)
    prompt_ids = teacher_prompt_ids(tokenizer, messages, template) if tokenizer is not None else None
    return list(await asyncio.gather(*(
        _guard(lambda c=c: loglik_one(client, prompt, prompt_ids, tokenizer, c, model), client.retries)
        for c in completions)))


_INT = re.compile(r"\d+")


def parse_ranking(text: str, k: int) -> Optional[list]:
    """'3 > 1 > 2', 'Ranking: [3, 1, 2]', 'Response 3, then Response 1 ...' -> 0-based order
    of the responses found (first = best); unmentioned ones are appended last. None if no
    valid response number appears."""
    seen = []
    for m in _INT.findall(text):
        i = int(m) - 1
        if 0 <= i < k and i not in seen:
            seen.append(i)
    if not seen:
        return None
    return seen + [i for i in range(k) if i not in seen]


def rank_request(question: str, completions: list) -> str:
    """The user message that asks the teacher to rank ``completions`` listwise."""
    listing = "\n\n".join(f"Response {i + 1}:\n{c}" for i, c in enumerate(completions))
    return (f"Rank these {len(completions)} responses to the question from best to worst. Reply with the "
            f"response numbers only, best first, like '2 > 1 > 3'.\n\nQuestion:\n{question}\n\n{listing}")


async def score_rank(client: TeacherClient, messages, reference, completions, *,
                     model: Optional[str] = None, **_) -> list:
    k = len(completions)
    if k < 2:
        return [None] * k
    ask = rank_request(messages[-1]["content"], completions)

    async def ranked():
        data = await client.chat({"model": model, "messages": [{"role": "user", "content": ask}],
                                  "temperature": 0, "max_tokens": 64})
        order = parse_ranking(data["choices"][0]["message"].get("content") or "", k)
        if order is None:
            raise MalformedResponse("ranking without response numbers")
        scores = [0.0] * k
        for pos, i in enumerate(order):
            scores[i] = (k - 1 - pos) / (k - 1)
        return scores

    return await _guard(ranked, client.retries) or [None] * k


_SCORE = re.compile(r"score\s*[:=]?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_critique(text: str) -> Optional[float]:
    """'... Score: 7/10' -> 0.7; the last number in 0..10 when there is no 'Score:'."""
    found = _SCORE.findall(text)
    candidates = found or re.findall(r"\d+(?:\.\d+)?", text)
    for raw in reversed(candidates):
        value = float(raw)
        if 0 <= value <= 10:
            return value / 10.0
    return None


async def score_critique(client: TeacherClient, messages, reference, completions, *,
                         model: Optional[str] = None, **_) -> list:
    question = messages[-1]["content"]

    async def one(text: str):
        ask = ("Critique the response to the question for correctness, clarity and completeness, "
               "then end with 'Score: N' where N is from 0 (useless) to 10 (perfect).\n\n"
               f"Question:\n{question}\n\nResponse:\n{text}")
        data = await client.chat({"model": model, "messages": [{"role": "user", "content": ask}],
                                  "temperature": 0, "max_tokens": 256})
        score = parse_critique(data["choices"][0]["message"].get("content") or "")
        if score is None:
            raise MalformedResponse("critique without a score")
        return score

    return list(await asyncio.gather(*(_guard(lambda c=c: one(c), client.retries) for c in completions)))


async def score_verify(client, messages, reference, completions, **_) -> object:
    if reference is None:
        return NOT_APPLICABLE
    return [1.0 if answer_matches(c, reference) else 0.0 for c in completions]


SCORERS = {"loglik": score_loglik, "rank": score_rank, "critique": score_critique,
           "verify": score_verify}


def combine(per_scorer: list, weights: list, k: int) -> list:
    """Weighted sum per sample over the scorers that apply; a sample any applicable scorer
    failed on is None (dropped from its group)."""
    out = [0.0] * k
    applicable = [(s, w) for s, w in zip(per_scorer, weights) if s is not NOT_APPLICABLE]
    if not applicable:
        return [None] * k
    for scores, w in applicable:
        for i in range(k):
            if out[i] is None or scores[i] is None:
                out[i] = None
            else:
                out[i] += w * scores[i]
    return out
