"""Input corpora -> a stream of documents, with bad records counted instead of fatal.

Inputs are files, directories (searched recursively) and globs of ``.jsonl``/``.json`` (one
object per line), ``.jsonl.gz``, ``.jsonl.zst``, ``.parquet`` and text files (``.txt``, ``.md``, source code: a
document per file, or per blank-line-separated block). :func:`iter_documents` yields, for each record,
either a :class:`Document` (its ``--json-keys`` values, the bytes read, and ``file:line``) or a
:class:`Skipped` naming why (``malformed_json``, ``invalid_utf8``, ``missing_key``,
``not_text``, ``empty``). Reading streams: memory does not grow with the input.

For parallel preprocessing, :func:`plan_pieces` cuts the inputs into ordered :class:`Piece` s
(:func:`iter_piece` reads one): uncompressed JSONL at line starts and text blocks after blank
lines, by byte range, each range knowing its first line number so positions stay absolute;
compressed files, parquet and whole-file text are never split, and small files are grouped.
Reading the pieces in order yields exactly what :func:`iter_documents` yields for the files.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from megatron_vpmoe.utils.errors import InputError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".rs", ".go", ".js", ".ts")
SUFFIXES = JSONL_SUFFIXES + (".parquet",) + TEXT_SUFFIXES


@dataclass
class Document:
    where: str  # file:line (or file:row / file:block)
    fields: Dict[str, Union[str, list]]  # --json-keys -> text, or a list of chat messages
    nbytes: int  # input bytes consumed (progress)


@dataclass
class Skipped:
    where: str
    reason: str
    nbytes: int


def _has_suffix(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in SUFFIXES)


def expand_inputs(patterns: Sequence[str]) -> List[Path]:
    """Files of every pattern (file, directory, glob) in a stable order, each once."""
    files: List[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _has_suffix(q))
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(q) for q in glob.glob(pattern, recursive=True) if Path(q).is_file())
        if not found:
            raise InputError(f"{pattern}: no input files (supported: {', '.join(SUFFIXES)})")
        for f in found:
            if not _has_suffix(f):
                raise InputError(f"{f}: unsupported input type (supported: {', '.join(SUFFIXES)})")
        files.extend(found)
    seen, unique = set(), []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _decompressed(path: Path, raw):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw)
    return raw


def _lines(path: Path, start: int = 0, end: Optional[int] = None, first_line: int = 1) -> Iterator[tuple]:
    """``(line number, line bytes, input bytes consumed since the previous line)`` of the byte
    range ``[start, end)`` (uncompressed files only; ``start`` is a line start numbered
    ``first_line``); for compressed files the consumed bytes are compressed ones, so progress
    matches file sizes."""
    with open(path, "rb") as raw:
        stream = _decompressed(path, raw)
        if start or end is not None:
            if stream is not raw:
                raise ValueError(f"{path}: a compressed file cannot be read by byte range")
            raw.seek(start)
        pending, lineno, last_pos, pos = b"", first_line - 1, start, start
        while True:
            want = 1 << 20 if end is None else min(1 << 20, end - pos)
            chunk = stream.read(want) if want > 0 else b""
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            pos = raw.tell()
            for i, line in enumerate(complete):
                lineno += 1
                consumed = pos - last_pos if i == len(complete) - 1 else 0
                if consumed:
                    last_pos = pos
                yield lineno, line, consumed
        if pending:
            yield lineno + 1, pending, raw.tell() - last_pos


def _pick(record: dict, keys: Sequence[str], where: str, nbytes: int):
    fields = {}
    for key in keys:
        value = record
        for part in key.split("."):  # dotted paths reach into nested objects
            if not isinstance(value, dict) or part not in value:
                return Skipped(where, "missing_key", nbytes)
            value = value[part]
        if isinstance(value, str):
            if not value.strip():
                return Skipped(where, "empty", nbytes)
        elif isinstance(value, list):
            if not value:
                return Skipped(where, "empty", nbytes)
        else:
            return Skipped(where, "not_text", nbytes)
        fields[key] = value
    return Document(where, fields, nbytes)


def _jsonl(path: Path, keys: Sequence[str], span: tuple = (0, None, 1)) -> Iterator[Union[Document, Skipped]]:
    carried = 0
    for lineno, line, nbytes in _lines(path, *span):
        where, nbytes, carried = f"{path}:{lineno}", nbytes + carried, 0
        if not line.strip():
            carried = nbytes
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield Skipped(where, "invalid_utf8", nbytes)
            continue
        try:
            record = json.loads(text)
        except ValueError:
            yield Skipped(where, "malformed_json", nbytes)
            continue
        if not isinstance(record, dict):
            yield Skipped(where, "malformed_json", nbytes)
            continue
        yield _pick(record, keys, where, nbytes)


def _parquet(path: Path, keys: Sequence[str]) -> Iterator[Union[Document, Skipped]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow's own error types
        raise InputError(f"{path}: not a readable parquet file ({err})") from None
    top = sorted({k.split(".")[0] for k in keys})
    missing = [k for k in top if k not in pf.schema_arrow.names]
    if missing:
        raise InputError(f"{path}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=top):
        per_row_bytes = max(1, batch.nbytes // max(batch.num_rows, 1))
        for record in batch.to_pylist():
            row += 1
            yield _pick(record, keys, f"{path}:row{row}", per_row_bytes)


def _text(path: Path, key: str, blocks: bool, span: tuple = (0, None, 1)) -> Iterator[Union[Document, Skipped]]:
    if not blocks:
        with open(path, "rb") as raw:
            data = _decompressed(path, raw).read()
            size = raw.tell()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            yield Skipped(f"{path}:byte{err.start}", "invalid_utf8", size)
            return
        yield Document(f"{path}:1", {key: text}, size) if text.strip() else Skipped(f"{path}:1", "empty", size)
        return
    block: List[bytes] = []
    start = consumed = 0
    for lineno, line, nbytes in _lines(path, *span):
        consumed += nbytes
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
            continue
        if block:
            yield _text_block(path, start, block, key, consumed)
            block, consumed = [], 0
    if block:
        yield _text_block(path, start, block, key, consumed)


def _text_block(path: Path, start: int, lines: List[bytes], key: str, nbytes: int):
    raw = b"\n".join(lines)
    try:
        return Document(f"{path}:{start}", {key: raw.decode("utf-8")}, nbytes)
    except UnicodeDecodeError:
        return Skipped(f"{path}:{start}", "invalid_utf8", nbytes)


def iter_documents(files: Sequence[Path], json_keys: Sequence[str], *,
                   txt_blocks: bool = False) -> Iterator[Union[Document, Skipped]]:
    """Every record of ``files`` in order (module docstring). ``.txt`` inputs give their text
    under the first json key; ``txt_blocks`` splits them at blank lines."""
    for path in files:
        yield from _file_records(Path(path), json_keys, txt_blocks, (0, None, 1))


def _file_records(path: Path, json_keys: Sequence[str], txt_blocks: bool, span: tuple):
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _parquet(path, json_keys)
    if name.endswith(TEXT_SUFFIXES):
        return _text(path, json_keys[0], txt_blocks, span)
    return _jsonl(path, json_keys, span)


# ---- pieces: the inputs cut for parallel workers ------------------------------------------

@dataclass(frozen=True)
class Segment:
    """Bytes ``[start, end)`` of a file whose first line is ``first_line`` (``end`` None: the
    whole file, read as :func:`iter_documents` reads it)."""

    path: Path
    start: int = 0
    end: Optional[int] = None
    first_line: int = 1


@dataclass(frozen=True)
class Piece:
    """Consecutive segments of the input, read in order by one worker."""

    index: int
    segments: Tuple[Segment, ...]
    nbytes: int  # bytes on disk (progress)


def iter_piece(piece: Piece, json_keys: Sequence[str], *,
               txt_blocks: bool = False) -> Iterator[Union[Document, Skipped]]:
    """The records of one piece, positions numbered as in the whole file."""
    for seg in piece.segments:
        yield from _file_records(seg.path, json_keys, txt_blocks, (seg.start, seg.end, seg.first_line))


def _splittable(path: Path, txt_blocks: bool) -> bool:
    """Uncompressed line-oriented records: JSONL at any line start, text blocks after a blank line."""
    name = path.name.lower()
    if name.endswith((".gz", ".zst", ".parquet")):
        return False
    if name.endswith(TEXT_SUFFIXES):
        return txt_blocks
    return True


def _count_newlines(f, start: int, end: int) -> int:
    f.seek(start)
    n, remaining = 0, end - start
    while remaining > 0:
        chunk = f.read(min(1 << 22, remaining))
        if not chunk:
            break
        n += chunk.count(b"\n")
        remaining -= len(chunk)
    return n


def _boundary(f, target: int, size: int, after_blank: bool) -> int:
    """The first record start at or after ``target``: a line start (JSONL), or the start of the
    line after a blank one (text blocks, whose records span lines); ``size`` if none."""
    f.seek(target - 1)
    line = f.readline()  # the rest of the line holding byte target-1
    pos = target - 1 + len(line)
    if after_blank:
        while line.endswith(b"\n"):
            line = f.readline()
            pos += len(line)
            if not line.strip():  # a blank line (or the end of the file) closes every block
                break
    return min(pos, size)


def split_file(path: Path, pieces: int, after_blank: bool = False) -> List[Segment]:
    """``path`` cut into at most ``pieces`` byte ranges of about equal size, each starting at a
    record start and numbered with its first line (newlines counted on the way)."""
    size = path.stat().st_size
    if pieces <= 1 or size == 0:
        return [Segment(path, 0, size, 1)]
    out: List[Segment] = []
    start, line = 0, 1
    with open(path, "rb") as f:
        for k in range(1, pieces):
            target = size * k // pieces
            if target <= start:
                continue
            end = _boundary(f, target, size, after_blank)
            if end >= size:
                break
            out.append(Segment(path, start, end, line))
            line += _count_newlines(f, start, end)
            start = end
    out.append(Segment(path, start, size, line))
    return out


def plan_pieces(files: Sequence[Path], piece_bytes: int, *, txt_blocks: bool = False) -> List[Piece]:
    """The inputs as ordered pieces of about ``piece_bytes``: large splittable files cut by byte
    range, consecutive small files grouped, other files whole."""
    pieces: List[Piece] = []
    group: List[Segment] = []
    group_bytes = 0

    def close_group():
        nonlocal group, group_bytes
        if group:
            pieces.append(Piece(len(pieces), tuple(group), group_bytes))
            group, group_bytes = [], 0

    for path in files:
        path = Path(path)
        size = path.stat().st_size
        if _splittable(path, txt_blocks) and size > piece_bytes:
            close_group()
            blocks = path.name.lower().endswith(TEXT_SUFFIXES)  # (txt_blocks: else not splittable)
            for seg in split_file(path, -(-size // piece_bytes), after_blank=blocks):
                pieces.append(Piece(len(pieces), (seg,), seg.end - seg.start))
            continue
        if group_bytes and group_bytes + size > piece_bytes:
            close_group()
        group.append(Segment(path))
        group_bytes += size
    close_group()
    return pieces


def total_bytes(files: Sequence[Path]) -> int:
    """Bytes on disk (compressed inputs count their compressed size; progress is approximate)."""
    return sum(f.stat().st_size for f in files)
