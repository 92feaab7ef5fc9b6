"""The OpenAI-compatible HTTP API (aiohttp): ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Request and response bodies follow OpenAI's (legacy) completions and chat-completions formats,
as vLLM and SGLang serve them, so the distillation client talks to this server and to a GPT-OSS
deployment the same way. ``/v1/completions`` with ``echo`` + ``logprobs`` returns the prompt
tokens' log-probs (``max_tokens: 0`` scores without generating). Chat answers of Harmony
models come back as ``content`` (final channel) and ``reasoning_content`` (analysis channel).
Every backend call goes through the :class:`BatchQueue`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from megatron_vpmoe.serve.backends import Backend, SampleParams
from megatron_vpmoe.serve.batching import BatchQueue
from megatron_vpmoe.serve.chat_format import parse_harmony_completion
from megatron_vpmoe.utils.errors import InputError


class BadRequest(Exception):
    pass


def _field(body: dict, name: str, kind, default, *, lo=None, hi=None):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"'{name}' must be {kind.__name__}, got {value!r}")
    if lo is not None and value < lo or hi is not None and value > hi:
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise BadRequest(f"'{name}' must be {bound}, got {value!r}")
    return value


def _stops(body: dict) -> list:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of them")
    return stop


def _sample_params(body: dict, stop_ids: tuple, default_max: int) -> tuple[SampleParams, int]:
    max_tokens = _field(body, "max_completion_tokens", int, None, lo=0) or _field(
        body, "max_tokens", int, default_max, lo=0)
    params = SampleParams(
        max_new_tokens=max_tokens,
        temperature=_field(body, "temperature", float, 1.0, lo=0.0, hi=100.0),
        top_p=_field(body, "top_p", float, 1.0, lo=0.0, hi=1.0),
        seed=_field(body, "seed", int, None),
        stop_ids=tuple(stop_ids),
    )
    if params.top_p == 0.0:
        raise BadRequest("'top_p' must be > 0")
    n = _field(body, "n", int, 1, lo=1, hi=128)
    return params, n


class OpenAIServer:
    def __init__(self, backend: Backend, *, window_ms: float = 5.0, max_batch: int = 32):
        self.backend = backend
        self.queue = BatchQueue(window_ms=window_ms, max_batch=max_batch)
        self.created = int(time.time())

    # plumbing -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/completions", self._wrap(self.completions))
        app.router.add_post("/v1/chat/completions", self._wrap(self.chat_completions))
        app.on_startup.append(lambda _app: self.queue.start())
        app.on_cleanup.append(lambda _app: self.queue.stop())
        return app

    def _wrap(self, handler):
        async def run(request: web.Request) -> web.Response:
            try:
                body = await request.json()
            except ValueError:
                return _error(400, "request body is not valid JSON")
            if not isinstance(body, dict):
                return _error(400, "request body must be a JSON object")
            try:
                if body.get("stream"):
                    raise BadRequest("streaming responses are not supported; send 'stream': false")
                return web.json_response(await handler(body))
            except (BadRequest, InputError) as err:
                return _error(400, str(err))
        return run

    async def health(self, request: web.Request) -> web.Response:
        s = self.queue.stats
        return web.json_response({"status": "ok", "batches": s.calls, "rows": s.rows,
                                  "max_batch_rows": s.max_rows})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.backend.model_id, "object": "model", "created": self.created,
             "owned_by": "megatron_vpmoe"}]})

    async def _generate(self, prompts: list, params: SampleParams) -> list:
        if params.max_new_tokens == 0:
            from megatron_vpmoe.serve.backends import Sampled

            return [Sampled([], [], "length") for _ in prompts]
        return await self.queue.submit(("gen",) + params.key(), prompts,
                                       lambda rows: self.backend.generate(rows, params))

    async def _score(self, sequences: list) -> list:
        return await self.queue.submit(("score",), sequences, self.backend.score)

    # /v1/completions ------------------------------------------------------------------------
    def _prompts(self, prompt: Any) -> list[tuple[str, list, list]]:
        """``prompt`` in any OpenAI form -> [(text, ids, char offsets)]."""
        b = self.backend
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("'prompt' must be a string, a token list, or a list of either")
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids, offs = b.encode_with_offsets(p)
                out.append((p, ids, offs))
            elif isinstance(p, list) and p and all(isinstance(t, int) and t >= 0 for t in p):
                if b.vocab_size is not None and max(p) >= b.vocab_size:
                    raise BadRequest(f"token id {max(p)} is outside the vocabulary ({b.vocab_size})")
                out.append((b.decode(p), list(p), b.offsets(p)))
            else:
                raise BadRequest("each prompt must be a string or a non-empty list of token ids")
            if not out[-1][1]:
                raise BadRequest("a prompt encodes to no tokens")
        return out

    async def completions(self, body: dict) -> dict:
        b = self.backend
        prompts = self._prompts(body.get("prompt"))
        params, n = _sample_params(body, b.eos_ids, 16)
        echo = _field(body, "echo", bool, False)
        want_lp = body.get("logprobs") is not None and body.get("logprobs") is not False
        stops = _stops(body)
        rows = [ids for _, ids, _ in prompts for _ in range(n)]
        samples = await self._generate(rows, params)
        prompt_lps = await self._score([ids for _, ids, _ in prompts]) if echo and want_lp else None
        choices, completion_tokens = [], 0
        for i, sample in enumerate(samples):
            p = i // n
            text, ids, offs = prompts[p]
            gen_text, gen_tokens, gen_lps, finish = _apply_stops(b, sample, stops)
            completion_tokens += len(gen_tokens)
            choice = {"index": i, "text": (text if echo else "") + gen_text, "finish_reason": finish}
            if want_lp:
                tokens, lps, offsets = [], [], []
                if echo:
                    tokens += [b.decode([t]) for t in ids]
                    lps += prompt_lps[p]
                    offsets += offs
                base = len(text) if echo else 0
                tokens += [b.decode([t]) for t in gen_tokens]
                lps += gen_lps
                offsets += [base + o for o in b.offsets(gen_tokens)]
                choice["logprobs"] = {"tokens": tokens, "token_logprobs": lps,
                                      "text_offset": offsets, "top_logprobs": None}
            else:
                choice["logprobs"] = None
            choices.append(choice)
        prompt_tokens = sum(len(ids) for _, ids, _ in prompts)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": b.model_id, "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens)}

    # /v1/chat/completions -------------------------------------------------------------------
    async def chat_completions(self, body: dict) -> dict:
        b = self.backend
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        prompt_text = b.chat_prompt(messages)
        prompt_ids = b.encode(prompt_text)
        params, n = _sample_params(body, b.chat_stop_ids(), 256)
        stops = _stops(body)
        samples = await self._generate([prompt_ids] * n, params)
        choices, completion_tokens = [], 0
        for i, sample in enumerate(samples):
            text, tokens, lps, finish = _apply_stops(b, sample, stops)
            completion_tokens += len(tokens)
            message = {"role": "assistant"}
            if b.is_harmony:
                split = parse_harmony_completion(text)
                message["content"] = split.final
                message["reasoning_content"] = split.reasoning
            else:
                message["content"] = text
            choice = {"index": i, "message": message, "finish_reason": finish}
            if body.get("logprobs"):
                choice["logprobs"] = {"content": [
                    {"token": b.decode([t]), "logprob": lp} for t, lp in zip(tokens, lps)]}
            choices.append(choice)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": b.model_id, "choices": choices,
                "usage": _usage(len(prompt_ids), completion_tokens)}


def _apply_stops(b: Backend, sample, stops: list):
    """Decode a sample and cut it at the first stop string (tokens cut to match)."""
    text = b.decode(sample.tokens)
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut < 0:
        return text, sample.tokens, sample.logprobs, sample.finish_reason
    offsets = b.offsets(sample.tokens)
    keep = sum(1 for o in offsets if o < cut)
    return text[:cut], sample.tokens[:keep], sample.logprobs[:keep], "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                         "code": status}}, status=status)
