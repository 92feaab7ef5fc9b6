"""The OpenAI-compatible HTTP API (aiohttp): ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Request and response bodies follow OpenAI's (legacy) completions and chat-completions formats,
as vLLM and SGLang serve them, so the distillation client talks to this server and to a GPT-OSS
deployment the same way. ``/v1/completions`` with ``echo`` + ``logprobs`` returns the prompt
tokens' log-probs (``max_tokens: 0`` scores without generating). Chat answers of Harmony
models come back as ``content`` (final channel) and ``reasoning`` / ``reasoning_content`` (analysis
channel), as vLLM returns GPT-OSS output.
Every backend call goes through the :class:`BatchQueue`.

Bounds (:class:`ServeLimits`, ``vpmoe serve`` flags): at most ``max_pending`` requests are
admitted at once (reading, tokenising, queued or generating; more get 503 with
``Retry-After``); a body over ``max_request_bytes`` gets 413 before it is read; a prompt longer
than ``max_prompt_tokens`` gets 400 before it is tokenised when its length alone proves it (more
than ``max_prompt_tokens`` times the longest token's characters), else right after; a request
whose rows (prompts x ``n``) x ``max_tokens`` exceed ``max_request_tokens`` gets 400 before
anything runs. Tokenising and building responses run on a worker thread, never on the event
loop. Every field is checked (finite floats, bounded ints: ``logprobs`` / ``top_logprobs`` at most
:data:`MAX_LOGPROBS`), a body nested deeper than :data:`json_bounded.MAX_DEPTH` levels is a 400, and
every error, 500 included, is a JSON body.

Special tokens: ``/v1/chat/completions`` encodes message contents as plain text (a user writing
``<|start|>`` gets the characters, never the turn marker; only the template's own markers are
special tokens). ``/v1/completions`` takes the prompt in the model's own format, as vLLM does: a
text prompt is encoded with special-token strings parsed as special tokens (so a caller can send
rendered Harmony text and score it); send a list of token ids to control every token exactly. A client that disconnects withdraws its request (see :mod:`batching`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from megatron_vpmoe.data.chat import encode_pieces, render_pieces
from megatron_vpmoe.inference.backend import Backend, Sampled, SampleParams
from megatron_vpmoe.serve.batching import BatchQueue
from megatron_vpmoe.data.chat_format import HARMONY_STOPS, parse_harmony_completion, render_harmony_prompt
from megatron_vpmoe.serve.limits import ServeLimits
from megatron_vpmoe.utils import json_bounded
from megatron_vpmoe.utils.errors import InputError


MAX_SEED = 2**63 - 1
MAX_N = 128
MAX_STOPS = 16
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
_log = logging.getLogger(__name__)


class BadRequest(Exception):
    status = 400


class TooLarge(BadRequest):
    status = 413


def _field(body: dict, name: str, kind, default, *, lo=None, hi=None):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 1e300:
            raise BadRequest(f"'{name}' is out of range, got {_short(value)}")
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"'{name}' must be {kind.__name__}, got {_short(value)}")
    if kind is float and not math.isfinite(value):
        raise BadRequest(f"'{name}' must be a finite number, got {value!r}")
    if lo is not None and value < lo or hi is not None and value > hi:
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise BadRequest(f"'{name}' must be {bound}, got {_short(value)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _stops(body: dict) -> list:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOPS:
        raise BadRequest(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them")
    return stop


def _sample_params(body: dict, stop_ids: tuple, default_max: int, limits: ServeLimits) -> tuple[SampleParams, int]:
    cap = limits.max_request_tokens
    max_tokens = _field(body, "max_completion_tokens", int, None, lo=0, hi=cap)
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, default_max, lo=0, hi=cap)
    params = SampleParams(
        max_new_tokens=max_tokens,
        temperature=_field(body, "temperature", float, 1.0, lo=0.0, hi=100.0),
        top_p=_field(body, "top_p", float, 1.0, lo=0.0, hi=1.0),
        seed=_field(body, "seed", int, None, lo=0, hi=MAX_SEED),
        stop_ids=tuple(stop_ids),
    )
    if params.top_p == 0.0:
        raise BadRequest("'top_p' must be > 0")
    n = _field(body, "n", int, 1, lo=1, hi=MAX_N)
    return params, n


def _logprobs(body: dict, name: str) -> bool:
    """Whether ``name`` asks for log-probs: null/false/absent no; true or 0..MAX_LOGPROBS yes."""
    value = body.get(name)
    if value is None or value is False:
        return False
    if value is True:
        return True
    return _field(body, name, int, None, lo=0, hi=MAX_LOGPROBS) is not None


def _check_budget(rows: int, params: SampleParams, limits: ServeLimits) -> None:
    if rows * params.max_new_tokens > limits.max_request_tokens:
        raise BadRequest(f"{rows} sequences (prompts x n) x max_tokens {params.max_new_tokens} = "
                         f"{rows * params.max_new_tokens} tokens is over this server's "
                         f"{limits.max_request_tokens} per request (--max-request-tokens)")


class OpenAIServer:
    def __init__(self, backend: Backend, *, window_ms: float = 5.0, max_batch: int = 32,
                 limits: ServeLimits | None = None):
        self.backend = backend
        self.limits = limits or ServeLimits()
        self.limits.check()
        self.queue = BatchQueue(window_ms=window_ms, max_batch=max_batch)
        self.created = int(time.time())
        self.pending = 0  # admitted requests
        self.rejected = {"busy": 0, "too_large": 0, "bad_request": 0}
        # tokenising and response building: off the event loop, one at a time (a fast
        # tokenizer must not be used from two threads at once)
        self._cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vpmoe-tokenize")

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    # plumbing -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_request_bytes)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/completions", self._wrap(self.completions))
        app.router.add_post("/v1/chat/completions", self._wrap(self.chat_completions))
        app.on_startup.append(lambda _app: self.queue.start())
        app.on_cleanup.append(lambda _app: self.queue.stop())
        app.on_cleanup.append(lambda _app: self._shutdown_cpu())
        return app

    async def _shutdown_cpu(self) -> None:
        self._cpu.shutdown(wait=False, cancel_futures=True)

    def _wrap(self, handler):
        async def run(request: web.Request) -> web.Response:
            if self.pending >= self.limits.max_pending:
                self.rejected["busy"] += 1
                return _error(503, f"server busy: {self.pending} requests in progress (at most "
                                   f"{self.limits.max_pending}); retry later", headers={"Retry-After": "1"})
            self.pending += 1
            try:
                return await self._handle(request, handler)
            finally:
                self.pending -= 1
        return run

    async def _handle(self, request: web.Request, handler) -> web.Response:
        limit = self.limits.max_request_bytes
        try:
            if request.content_length is not None and request.content_length > limit:
                raise TooLarge(f"request body of {request.content_length} bytes is over this server's "
                               f"{limit} (--max-request-bytes)")
            try:
                body = json_bounded.loads(await request.read())
            except web.HTTPRequestEntityTooLarge:
                raise TooLarge(f"request body is over this server's {limit} bytes (--max-request-bytes)") from None
            except json_bounded.TooDeep as err:
                raise BadRequest(f"request body is {err}") from None
            except ValueError:  # JSON, UTF-8, and integers of more than 4300 digits
                raise BadRequest("request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise BadRequest("request body must be a JSON object")
            if body.get("stream"):
                raise BadRequest("streaming responses are not supported; send 'stream': false")
            return web.json_response(await handler(body))
        except (BadRequest, InputError) as err:
            status = getattr(err, "status", 400)
            self.rejected["too_large" if status == 413 else "bad_request"] += 1
            return _error(status, str(err))
        except Exception as err:  # noqa: BLE001 - still a JSON answer, and the server keeps serving
            _log.exception("request failed")
            return _error(500, f"internal error: {type(err).__name__}: {err}"[:500], kind="server_error")

    async def health(self, request: web.Request) -> web.Response:
        s = self.queue.stats
        return web.json_response({"status": "ok", "batches": s.calls, "rows": s.rows,
                                  "max_batch_rows": s.max_rows, "cancelled_batches": s.cancelled,
                                  "pending": self.pending, "rejected": dict(self.rejected)})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.backend.model_id, "object": "model", "created": self.created,
             "owned_by": "megatron_vpmoe"}]})

    async def _generate(self, prompts: list, params: SampleParams) -> list:
        if params.max_new_tokens == 0:
            return [Sampled([], [], "length") for _ in prompts]
        return await self.queue.submit(("gen",) + params.key(), prompts,
                                       lambda rows, cancelled: self.backend.generate(rows, params, cancelled))

    async def _score(self, sequences: list) -> list:
        return await self.queue.submit(("score",), sequences, self._score_rows)

    def _score_rows(self, sequences: list, cancelled) -> list:
        """Each prompt token's log-prob given its prefix (the first one: None), for ``echo``."""
        scored = self.backend.score(sequences, [1] * len(sequences), cancelled)
        return [[None] + lp.tolist() for lp, _ in scored]

    def _check_text_length(self, text: str, what: str) -> None:
        """Refuse, before encoding, a text whose length alone proves too many tokens."""
        most = self.limits.max_prompt_tokens
        if len(text) > most * self.backend.max_token_chars():
            raise BadRequest(f"{what} of {len(text)} characters is over this server's {most} tokens "
                             f"(--max-prompt-tokens)")

    def _check_tokens(self, n: int, what: str) -> None:
        if n > self.limits.max_prompt_tokens:
            raise BadRequest(f"{what} of {n} tokens is over this server's {self.limits.max_prompt_tokens} "
                             f"(--max-prompt-tokens)")

    # /v1/completions ------------------------------------------------------------------------
    def _prompt_list(self, prompt: Any) -> list:
        """``prompt`` in any OpenAI form -> a list of strings and token lists, checked for type
        and length (no tokenising yet)."""
        b = self.backend
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("'prompt' must be a string, a token list, or a list of either")
        for i, p in enumerate(prompt):
            what = f"prompt {i}" if len(prompt) > 1 else "the prompt"
            if isinstance(p, str):
                self._check_text_length(p, what)
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in p):
                self._check_tokens(len(p), what)
                if b.vocab_size is not None and max(p) >= b.vocab_size:
                    raise BadRequest(f"token id {_short(max(p))} is outside the vocabulary ({b.vocab_size})")
            else:
                raise BadRequest("each prompt must be a string or a non-empty list of token ids")
        return prompt

    def _prompts(self, prompt: list) -> list[tuple[str, list, list]]:
        """Checked prompts (:meth:`_prompt_list`) -> [(text, ids, char offsets)] (worker thread)."""
        b = self.backend
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                ids, offs = b.encode_with_offsets(p, specials=True)  # the model's own format (module docstring)
                self._check_tokens(len(ids), f"prompt {i}" if len(prompt) > 1 else "the prompt")
                out.append((p, ids, offs))
            else:
                out.append((b.decode(p), list(p), b.offsets(p)))
            if not out[-1][1]:
                raise BadRequest("a prompt encodes to no tokens")
        return out

    async def completions(self, body: dict) -> dict:
        b = self.backend
        params, n = _sample_params(body, b.eos_ids, 16, self.limits)
        echo = _field(body, "echo", bool, False)
        want_lp = _logprobs(body, "logprobs")
        stops = _stops(body)
        checked = self._prompt_list(body.get("prompt"))
        _check_budget(len(checked) * n, params, self.limits)
        prompts = await self._off_loop(self._prompts, checked)
        rows = [ids for _, ids, _ in prompts for _ in range(n)]
        samples = await self._generate(rows, params)
        prompt_lps = await self._score([ids for _, ids, _ in prompts]) if echo and want_lp else None
        return await self._off_loop(self._completion_response, prompts, n, samples, prompt_lps, echo, want_lp,
                                    stops)

    def _completion_response(self, prompts, n, samples, prompt_lps, echo, want_lp, stops) -> dict:
        b = self.backend
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
        params, n = _sample_params(body, chat_stop_ids(b), 256, self.limits)
        stops = _stops(body)
        want_lp = _field(body, "logprobs", bool, False)
        _logprobs(body, "top_logprobs")  # accepted and checked; answers carry no top alternatives
        _check_budget(n, params, self.limits)
        self._check_text_length("".join(m["content"] for m in messages if isinstance(m, dict)
                                        and isinstance(m.get("content"), str)), "the messages")
        prompt_ids = await self._off_loop(self._chat_ids, messages)
        samples = await self._generate([prompt_ids] * n, params)
        return await self._off_loop(self._chat_response, prompt_ids, samples, stops, want_lp)

    def _chat_ids(self, messages: list) -> list:
        ids = encode_pieces(self.backend.tokenizer, chat_pieces(self.backend, messages))
        self._check_tokens(len(ids), "the chat prompt")
        return ids

    def _chat_response(self, prompt_ids, samples, stops, want_lp) -> dict:
        b = self.backend
        choices, completion_tokens = [], 0
        for i, sample in enumerate(samples):
            text, tokens, lps, finish = _apply_stops(b, sample, stops)
            completion_tokens += len(tokens)
            message = {"role": "assistant"}
            if b.is_harmony:
                split = parse_harmony_completion(text)
                message["content"] = split.final
                # vLLM's GPT-OSS answer: ``reasoning`` (current) and ``reasoning_content`` (older
                # vLLM, SGLang, transformers serve) carry the analysis channel
                message["reasoning"] = message["reasoning_content"] = split.reasoning
            else:
                message["content"] = text
            choice = {"index": i, "message": message, "finish_reason": finish}
            if want_lp:
                choice["logprobs"] = {"content": [
                    {"token": b.decode([t]), "logprob": lp} for t, lp in zip(tokens, lps)]}
            choices.append(choice)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": b.model_id, "choices": choices,
                "usage": _usage(len(prompt_ids), completion_tokens)}


def chat_pieces(b: Backend, messages: list) -> list:
    """The chat prompt as ``[(text, is_content)]`` (:func:`render_pieces`): Harmony models get
    the Harmony rendering, others their tokenizer's chat template."""
    return render_pieces(render_harmony_prompt if b.is_harmony else b.chat_template, messages)


def chat_stop_ids(b: Backend) -> tuple:
    """Harmony models stop at ``<|return|>``/``<|call|>``; others at end-of-sequence."""
    if b.is_harmony:
        return tuple(i for i in (b.token_id(t) for t in HARMONY_STOPS) if i is not None)
    return b.eos_ids


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


def _error(status: int, message: str, *, kind: str = "invalid_request_error", headers=None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status,
                             headers=headers)
