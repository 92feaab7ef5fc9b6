"""Async client for an OpenAI-compatible teacher (``vpmoe serve``, vLLM, SGLang) with retries.

Transient failures (connection refused or reset, timeouts, HTTP 429 and 5xx) are retried with
exponential backoff; when the retries run out :class:`TeacherUnavailable` is raised so the
caller can stop cleanly and keep what it has. A 4xx answer or a body that is not the expected
JSON raises :class:`MalformedResponse`, which callers count and skip.

Every wait is bounded: connecting, each socket read and the whole request each by ``timeout_s``
(> 0); an answer is read up to ``max_response_bytes`` (a larger ``Content-Length`` is refused
before reading, a body that grows past it is cut off) and parsed with a nesting limit
(:mod:`megatron_vpmoe.utils.json_bounded`). Only ``http://`` and ``https://`` URLs are accepted.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from typing import Optional
from urllib.parse import urlsplit

from megatron_vpmoe.utils import json_bounded
from megatron_vpmoe.utils.errors import InputError, VpmoeError

MAX_RESPONSE_BYTES = 16 << 20  # an answer of n x max_tokens samples with log-probs fits easily


class TeacherUnavailable(VpmoeError):
    """The teacher did not answer after every retry."""


class MalformedResponse(Exception):
    """The teacher answered, but not with a usable completion."""


def check_teacher_url(url: str, what: str = "teacher URL") -> str:
    """``url`` if it is an http(s) URL with a host, else :class:`InputError` naming ``what``."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{what} {url!r} must be an http:// or https:// URL with a host")
    return url


def check_client_options(*, timeout_s, retries, max_response_bytes, names=None) -> None:
    """:class:`InputError` naming the flag (``names``: option -> flag or key) of a value out of range."""
    names = {"timeout_s": "timeout_s", "retries": "retries", "max_response_bytes": "max_response_bytes",
             **(names or {})}
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) \
            or timeout_s <= 0:
        raise InputError(f"{names['timeout_s']} must be a finite number of seconds > 0, got {timeout_s!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InputError(f"{names['retries']} must be an integer >= 0, got {retries!r}")
    if isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, int) or max_response_bytes < 1:
        raise InputError(f"{names['max_response_bytes']} must be an integer >= 1, got {max_response_bytes!r}")


class TeacherClient:
    def __init__(self, base_url: str, *, timeout_s: float = 120.0, retries: int = 4,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0, concurrency: int = 8,
                 max_response_bytes: int = MAX_RESPONSE_BYTES):
        check_teacher_url(base_url)
        check_client_options(timeout_s=timeout_s, retries=retries, max_response_bytes=max_response_bytes)
        url = base_url.rstrip("/")
        self.base_url = url if url.endswith("/v1") else url + "/v1"
        self.max_response_bytes = max_response_bytes
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.concurrency = concurrency
        self.retried = 0  # transient failures that were retried
        self._session = None

    async def __aenter__(self) -> "TeacherClient":
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s, connect=self.timeout_s,
                                          sock_connect=self.timeout_s, sock_read=self.timeout_s),
            connector=aiohttp.TCPConnector(limit=self.concurrency))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def _request(self, method: str, path: str, body: Optional[dict] = None,
                       retries: Optional[int] = None) -> dict:
        import aiohttp

        retries = self.retries if retries is None else retries
        last = "no attempt"
        for attempt in range(retries + 1):
            if attempt:
                self.retried += 1
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
            try:
                async with self._session.request(method, self.base_url + path, json=body) as resp:
                    raw = await self._read(resp, path)
                    text = raw[:300].decode("utf-8", "replace")
                    if resp.status == 429 or resp.status >= 500:
                        last = f"HTTP {resp.status}: {text[:200]}"
                        continue
                    if resp.status >= 300:
                        raise MalformedResponse(f"HTTP {resp.status}: {text}")
                    try:
                        data = json_bounded.loads(raw)
                    except ValueError as err:  # bad JSON, bad UTF-8, too deep
                        why = str(err) if isinstance(err, json_bounded.TooDeep) else "not JSON"
                        raise MalformedResponse(f"response is {why}: {text[:200]!r}") from None
                    if not isinstance(data, dict):
                        raise MalformedResponse(f"response is not a JSON object: {text[:200]!r}")
                    return data
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:  # connection, payload, bad HTTP
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise TeacherUnavailable(
            f"teacher {self.base_url} did not answer {path} after {retries + 1} "
            f"attempt{'s' if retries else ''} ({last})")

    async def _read(self, resp, path: str) -> bytes:
        """The body, at most ``max_response_bytes`` of it (else :class:`MalformedResponse`)."""
        limit = self.max_response_bytes
        if resp.content_length is not None and resp.content_length > limit:
            resp.close()  # drop the connection rather than read what was announced
            raise MalformedResponse(f"answer to {path} announces {resp.content_length} bytes, over the "
                                    f"{limit} allowed (--max-response-bytes)")
        chunks, size = [], 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                resp.close()
                raise MalformedResponse(f"answer to {path} is over the {limit} bytes allowed "
                                        f"(--max-response-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def models(self, retries: int = 0) -> list[str]:
        data = await self._request("GET", "/models", retries=retries)
        try:
            return [m["id"] for m in data["data"]]
        except (KeyError, TypeError) as err:
            raise MalformedResponse(f"/models answer without data[].id: {data!r:.200}") from err

    async def chat(self, body: dict) -> dict:
        data = await self._request("POST", "/chat/completions", body)
        _check_choices(data, "message")
        return data

    async def completions(self, body: dict) -> dict:
        data = await self._request("POST", "/completions", body)
        _check_choices(data, "text")
        return data


def _check_choices(data: dict, key: str) -> None:
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise MalformedResponse(f"response without choices: {json.dumps(data)[:200]}")
    for c in choices:
        if not isinstance(c, dict) or key not in c:
            raise MalformedResponse(f"choice without '{key}': {json.dumps(c)[:200]}")
        if key == "message" and not isinstance(c["message"], dict):
            raise MalformedResponse(f"choice message is not an object: {json.dumps(c)[:200]}")
