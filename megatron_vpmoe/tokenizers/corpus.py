"""Training/evaluation text from files, globs and JSONL fields, with UTF-8 validation.

An input is ``PATH_OR_GLOB`` (plain text, one document per file; a directory contributes its
text files, recursively, through :func:`megatron_vpmoe.utils.inputs.expand_inputs` as preprocessing does) or ``FILE.jsonl:FIELD``
(one document per line, the string field ``FIELD``; nested fields with dots, e.g.
``messages.0.content``). Bad input raises :class:`InputError` naming the file, and the byte
offset (non-UTF-8) or line (bad JSON).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from megatron_vpmoe.utils.errors import InputError
from megatron_vpmoe.utils.inputs import PLAIN_TEXT_SUFFIXES, expand_inputs


def _split_field(spec: str) -> Tuple[str, str | None]:
    head, sep, tail = spec.rpartition(":")
    if sep and head and (head.endswith(".jsonl") or glob.has_magic(head) and ".jsonl" in head) and tail:
        return head, tail
    return spec, None


def resolve_inputs(inputs: Sequence[str]) -> List[Tuple[Path, str | None]]:
    """Expand directories (their text files, or ``.jsonl`` files with ``:FIELD``) and globs;
    every input must match at least one file."""
    if not inputs:
        raise InputError("no input files given")
    out = []
    for spec in inputs:
        pattern, field = _split_field(str(spec))
        suffixes = PLAIN_TEXT_SUFFIXES if field is None else (".jsonl",)
        out.extend((p, field) for p in expand_inputs([pattern], suffixes, strict=False))
    return out


def read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}: not UTF-8 at byte offset {err.start} (line {line}): {err.reason}") from None


def _field(record, dotted: str, where: str):
    value = record
    for part in dotted.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise InputError(f"{where}: no field {dotted!r}")
    if not isinstance(value, str):
        raise InputError(f"{where}: field {dotted!r} is not a string")
    return value


class Documents(list):
    """The documents read, and how many files (``files``) and UTF-8 bytes (``nbytes``) they came from."""

    files: int = 0
    nbytes: int = 0


def iter_documents(inputs: Sequence[str], opened: Optional[list] = None) -> Iterator[str]:
    """Each input's documents; ``opened`` (when given) gets each file as it is read."""
    for path, field in resolve_inputs(inputs):
        text = read_utf8(path)
        if opened is not None:
            opened.append(path)
        if field is None:
            yield text
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise InputError(f"{path}:{lineno}: invalid JSON ({err})") from None
            yield _field(record, field, f"{path}:{lineno}")


def load_documents(inputs: Sequence[str], max_bytes: int | None = None) -> Documents:
    """All documents (optionally the first ``max_bytes`` of UTF-8 text); empty corpus -> error."""
    docs, total, opened = Documents(), 0, []
    for doc in iter_documents(inputs, opened):
        if max_bytes is not None and total + len(doc.encode("utf-8")) > max_bytes:
            room = max_bytes - total
            if room > 0:
                docs.append(doc.encode("utf-8")[:room].decode("utf-8", errors="ignore"))
                total += len(docs[-1].encode("utf-8"))
            break
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    if not any(d.strip() for d in docs):
        raise InputError(f"empty corpus: {', '.join(map(str, inputs))} contain(s) no text")
    docs.files, docs.nbytes = len(opened), total
    return docs


def chunk_documents(docs: Sequence[str], chunk_chars: int = 4096) -> Iterator[str]:
    """Split documents into pieces of about ``chunk_chars`` at line breaks (trainers' batches)."""
    for doc in docs:
        start = 0
        while start < len(doc):
            end = min(len(doc), start + chunk_chars)
            if end < len(doc):
                cut = doc.rfind("\n", start + chunk_chars // 2, end)
                end = cut + 1 if cut > 0 else end
            yield doc[start:end]
            start = end
