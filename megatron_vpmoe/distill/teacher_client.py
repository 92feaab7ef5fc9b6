"""Async client for an OpenAI-compatible teacher (``vpmoe serve``, vLLM, SGLang) with retries.

Transient failures (connection refused or reset, timeouts, HTTP 429 and 5xx) are retried with
exponential backoff; when the retries run out :class:`TeacherUnavailable` is raised so the
caller can stop cleanly and keep what it has. A 4xx answer or a body that is not the expected
JSON raises :class:`MalformedResponse`, which callers count and skip.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Optional

from megatron_vpmoe.utils.errors import VpmoeError


class TeacherUnavailable(VpmoeError):
    """The teacher did not answer after every retry."""


class MalformedResponse(Exception):
    """The teacher answered, but not with a usable completion."""


class TeacherClient:
    def __init__(self, base_url: str, *, timeout_s: float = 120.0, retries: int = 4,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0, concurrency: int = 8):
        url = base_url.rstrip("/")
        self.base_url = url if url.endswith("/v1") else url + "/v1"
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
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
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
                    text = await resp.text()
                    if resp.status == 429 or resp.status >= 500:
                        last = f"HTTP {resp.status}: {text[:200]}"
                        continue
                    if resp.status >= 400:
                        raise MalformedResponse(f"HTTP {resp.status}: {text[:300]}")
                    try:
                        data = json.loads(text)
                    except ValueError as err:
                        raise MalformedResponse(f"response is not JSON: {text[:200]!r}") from err
                    if not isinstance(data, dict):
                        raise MalformedResponse(f"response is not a JSON object: {text[:200]!r}")
                    return data
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as err:
                last = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise TeacherUnavailable(
            f"teacher {self.base_url} did not answer {path} after {retries + 1} attempts ({last})")

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
