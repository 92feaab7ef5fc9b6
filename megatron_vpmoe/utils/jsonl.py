"""Strict JSONL reading: one JSON object per line, errors naming ``file:line``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

from megatron_vpmoe.utils.errors import InputError


def read_jsonl(path, limit: Optional[int] = None) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for each non-blank line of ``path``, the first ``limit`` records.

    A line that is not a JSON object raises :class:`InputError` naming the file and line (for
    inputs that must be clean: prompts, eval sets; preprocessing skips and counts instead).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    count = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if limit is not None and count >= limit:
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InputError(f"{path}:{lineno}: not UTF-8 ({err.reason} at byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object")
            count += 1
            yield lineno, rec
