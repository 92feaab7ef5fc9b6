"""Prompt files for teacher generation: jsonl records -> :class:`Prompt` (chat messages + reference).

Accepted record shapes (one JSON object per line):

* ``{"messages": [{"role": ..., "content": ...}, ...]}`` - trailing assistant turns are dropped
  (the teacher writes the answer); their text is kept as ``reference_text``;
* ``{"prompt": "..."}`` - one user turn;
* ``{"question": "...", "answer": "... #### 72"}`` - GSM8K style; the ``#### N`` number is the
  reference answer that generation checks (rejection sampling).

A prompt's id is its ``id`` field when present, else ``<file name>:<line>``; ids must be unique
across all files because resuming keys on them. Bad lines raise :class:`InputError` naming
``file:line``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_vpmoe.utils.answers import reference_answer
from megatron_vpmoe.utils.errors import InputError
from megatron_vpmoe.utils.jsonl import read_jsonl


@dataclass
class Prompt:
    id: str
    messages: list
    source: str  # file:line
    reference: Optional[str] = None  # a checkable final answer (e.g. GSM8K's number)
    reference_text: Optional[str] = None  # a human reference answer, not checked
    extra: dict = field(default_factory=dict)


def _parse_record(rec: dict, where: str) -> tuple[list, Optional[str], Optional[str]]:
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                    m.get("content"), str):
                raise InputError(f"{where}: messages[{i}] needs string 'role' and 'content'")
            if m["role"] not in ("system", "developer", "user", "assistant"):
                raise InputError(f"{where}: messages[{i}] has unknown role {m['role']!r}")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        ref_text = None
        while msgs and msgs[-1]["role"] == "assistant":
            ref_text = msgs.pop()["content"]
        if not any(m["role"] == "user" for m in msgs):
            raise InputError(f"{where}: 'messages' has no user turn to answer")
        return msgs, None, ref_text
    for key in ("prompt", "question"):
        if key in rec:
            if not isinstance(rec[key], str) or not rec[key].strip():
                raise InputError(f"{where}: '{key}' must be a non-empty string")
            answer = rec.get("answer")
            if answer is not None and not isinstance(answer, str):
                raise InputError(f"{where}: 'answer' must be a string")
            ref = reference_answer(answer) if answer else None
            return [{"role": "user", "content": rec[key]}], ref, answer if ref is None else None
    raise InputError(f"{where}: record has none of 'messages', 'prompt', 'question'")


def load_prompts(paths: list[str], limit: Optional[int] = None) -> list[Prompt]:
    """Every prompt of ``paths`` in order (at most ``limit`` per file); validates every line."""
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"{path}: no such prompt file")
        for lineno, rec in read_jsonl(p, limit):
            where = f"{path}:{lineno}"
            messages, ref, ref_text = _parse_record(rec, where)
            pid = str(rec["id"]) if isinstance(rec.get("id"), (str, int)) else f"{p.name}:{lineno}"
            if pid in seen:
                raise InputError(f"{where}: prompt id {pid!r} already used at {seen[pid]}")
            seen[pid] = where
            prompts.append(Prompt(pid, messages, where, ref, ref_text))
    if not prompts:
        raise InputError(f"no prompts in {', '.join(paths)}")
    return prompts
