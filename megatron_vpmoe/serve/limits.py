"""The server's bounds per request and in total (``vpmoe serve`` flags), without importing aiohttp."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeLimits:
    """Per-request and server-wide bounds, enforced by :mod:`megatron_vpmoe.serve.app`; the
    defaults fit a teacher serving distillation (prompts of a few thousand tokens, ``n`` x
    ``max_tokens`` of a few thousand)."""

    max_request_bytes: int = 1 << 20
    max_prompt_tokens: int = 16384
    max_request_tokens: int = 32768  # rows (prompts x n) x max_tokens
    max_pending: int = 64

    def check(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
