"""Pinning test: an answer of exactly ``max_response_bytes`` is read; one byte more is refused (announced or streamed)."""

import asyncio
from types import SimpleNamespace

import pytest

from megatron_vpmoe.distill.teacher_client import MalformedResponse, TeacherClient


def _resp(body: bytes, announced):
    async def iter_any():
        for i in range(0, len(body), 3):
            yield body[i:i + 3]

    return SimpleNamespace(content_length=announced, content=SimpleNamespace(iter_any=iter_any),
                           close=lambda: None)


def test_answer_of_exactly_the_limit_is_read():
    client = TeacherClient("http://localhost:1", max_response_bytes=8)
    assert asyncio.run(client._read(_resp(b"12345678", 8), "/x")) == b"12345678"
    assert asyncio.run(client._read(_resp(b"12345678", None), "/x")) == b"12345678"
    with pytest.raises(MalformedResponse, match="announces 9 bytes, over the 8 allowed"):
        asyncio.run(client._read(_resp(b"123456789", 9), "/x"))
    with pytest.raises(MalformedResponse, match="is over the 8 bytes allowed"):
        asyncio.run(client._read(_resp(b"123456789", None), "/x"))
