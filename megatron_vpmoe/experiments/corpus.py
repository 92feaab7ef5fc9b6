"""The tokenizer experiment's documents: plain text, JSONL fields and chat records, mixed once for every variant.

A source is one of

* ``{text: PATH}`` (or a bare path): ``.txt``/``.py`` files (a directory: its ``.txt`` then ``.py``
  files); a long file is cut into blank-line-separated paragraphs;
* ``{jsonl: PATH, field: KEY}``: one document per record, the string under ``KEY``;
* ``{chat: PATH}``: chat records (``messages``: the ``vpmoe distill build-corpus`` output), or
  with ``user:``/``thinking:``/``assistant:`` naming the record's fields (``../shared/data/kd``:
  GSM8K ``question``/``answer``, BBH ``question``/``cot``/``extracted_answer``).

Chat records are rendered to Harmony text here (:func:`megatron_vpmoe.data.chat.render_conversation`),
so every variant tokenizes the same strings and preprocessing gives them role masks (reasoning 1,
final 2, prompt 0). Sources are interleaved round-robin, document by document, so the training
and validation splits both hold every kind.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from megatron_vpmoe.utils.errors import ConfigError, InputError

SOURCE_KINDS = ("text", "jsonl", "chat")
CHAT_FIELDS = ("user", "thinking", "assistant")


@dataclass
class Source:
    kind: str  # text | jsonl | chat
    path: Path
    field: Optional[str] = None  # jsonl: the text field
    fields: Optional[Dict[str, str]] = None  # chat: {user, thinking, assistant} -> record key


def parse_source(raw, key: str, file: str, resolve) -> Source:
    """One ``corpus`` entry of an experiment config (``resolve`` makes a config path absolute)."""
    if isinstance(raw, str):
        raw = {"text": raw}
    if not isinstance(raw, dict) or not (set(raw) & set(SOURCE_KINDS)) or len(set(raw) & set(SOURCE_KINDS)) > 1:
        raise ConfigError("expected a path or one of {text: PATH}, {jsonl: PATH, field: KEY}, {chat: PATH}",
                          key=key, file=file)
    kind = next(k for k in SOURCE_KINDS if k in raw)
    allowed = {kind} | ({"field"} if kind == "jsonl" else set(CHAT_FIELDS) if kind == "chat" else set())
    for extra in raw:
        if extra not in allowed:
            raise ConfigError(f"unknown key (known: {', '.join(sorted(allowed))})", key=f"{key}.{extra}", file=file)
    path = resolve(str(raw[kind]))
    if not path.exists():
        raise ConfigError(f"{path} does not exist", key=key, file=file)
    if "eval" in path.parts and "data" in path.parts:
        raise ConfigError("training on ../shared/data/eval is not allowed", key=key, file=file)
    if kind == "jsonl" and not isinstance(raw.get("field"), str):
        raise ConfigError("a jsonl source needs field: KEY", key=key, file=file)
    fields = {f: str(raw[f]) for f in CHAT_FIELDS if f in raw} or None
    if kind == "chat" and fields and "assistant" not in fields:
        raise ConfigError("a chat source with field names needs assistant: KEY", key=key, file=file)
    return Source(kind, path, raw.get("field"), fields)


def _text_files(path: Path) -> List[Path]:
    return sorted(path.rglob("*.txt")) + sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _records(path: Path) -> Iterator[tuple]:
    from megatron_vpmoe.utils.jsonl import read_jsonl

    for lineno, rec in read_jsonl(path):
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object")
        yield lineno, rec


def _string(rec: dict, key: str, where: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str):
        raise InputError(f"{where}: no string field {key!r}")
    return value


def iter_documents(source: Source) -> Iterator[str]:
    """The source's documents as text (chat records rendered to Harmony)."""
    if source.kind == "text":
        for f in _text_files(source.path):
            text = f.read_text(encoding="utf-8", errors="replace")
            for para in (text.split("\n\n") if len(text) > 20_000 else [text]):
                if para.strip():
                    yield para + "\n"
        return
    from megatron_vpmoe.data.chat import render_conversation

    for lineno, rec in _records(source.path):
        where = f"{source.path}:{lineno}"
        if source.kind == "jsonl":
            text = _string(rec, source.field, where)
            if text.strip():
                yield text
            continue
        if source.fields:
            f = source.fields
            assistant = {"role": "assistant", "content": _string(rec, f["assistant"], where)}
            if "thinking" in f:
                assistant["thinking"] = _string(rec, f["thinking"], where)
            messages = [{"role": "user", "content": _string(rec, f.get("user", "question"), where)}, assistant]
        else:
            messages = rec.get("messages")
        yield render_conversation(messages, f"{where}: messages")


def mixed_documents(sources: List[Source]) -> Iterator[str]:
    """The sources' documents interleaved round-robin, one document from each in turn."""
    iters = [iter_documents(s) for s in sources]
    while iters:
        for it in list(iters):
            doc = next(it, None)
            if doc is None:
                iters.remove(it)
            else:
                yield doc


def read_splits(sources: List[Source], sizes: Dict[str, int]) -> Dict[str, List[str]]:
    """Consecutive splits of the mixed documents, each holding at least its UTF-8 byte size
    (the last document may cross it); a split left empty is an error naming the sources."""
    docs = mixed_documents(sources)
    out: Dict[str, List[str]] = {}
    for split, size in sizes.items():
        out[split], total = [], 0
        while total < size:
            doc = next(docs, None)
            if doc is None:
                break
            out[split].append(doc)
            total += len(doc.encode("utf-8"))
        if not out[split]:
            raise InputError(f"{', '.join(str(s.path) for s in sources)}: no documents left for the {split} split")
    return out


def documents_digest(docs: List[str]) -> str:
    """sha256 over the documents in order (each one's UTF-8 bytes, length-prefixed)."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def write_documents(out: Path, splits: Dict[str, List[str]]) -> Dict[str, Path]:
    """``documents/{split}.jsonl`` (``text``), written once (atomically); returns the paths."""
    from megatron_vpmoe.utils.atomic import atomic_write_text

    paths = {}
    for split, docs in splits.items():
        path = out / "documents" / f"{split}.jsonl"
        if not path.is_file():
            atomic_write_text(path, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
        paths[split] = path
    return paths


def read_written(path: Path) -> List[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
