"""JSON from the network parsed with a nesting limit: too deep is a ``ValueError``, never a ``RecursionError``.

The teacher client (answers of a remote server) and ``vpmoe serve`` (request bodies) both parse
with :func:`loads`, so a body like ``"[" * 200000 + "]" * 200000`` is refused as bad JSON (a
malformed answer, a 400) instead of escaping as a traceback or a 500, and an object that parsed
but nests deeper than :data:`MAX_DEPTH` never reaches code (``repr``, ``json.dumps``, recursive
walks) that would recurse on it.
"""

from __future__ import annotations

import json
from typing import Any, Union

MAX_DEPTH = 64  # OpenAI-style requests and answers nest 5-6 levels


class TooDeep(ValueError):
    """The JSON nests deeper than the limit."""


def depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar: 0, ``[]``: 1), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in item if isinstance(child, (list, dict)))
    return deepest


def loads(text: Union[str, bytes], max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` that raises :class:`TooDeep` (a ``ValueError``) past ``max_depth`` levels."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise TooDeep(f"JSON nested deeper than {max_depth} levels") from None
    if isinstance(value, (list, dict)) and depth(value) > max_depth:
        raise TooDeep(f"JSON nested deeper than {max_depth} levels")
    return value
