"""Input corpora -> a stream of documents, with bad records counted instead of fatal.

Inputs are files, directories (searched recursively) and globs of ``.jsonl``/``.json`` (one
object per line), ``.jsonl.gz``, ``.jsonl.zst``, ``.parquet`` and text files (``.txt``, ``.md``, source code: a
document per file, or per blank-line-separated block). :func:`iter_documents` yields, for each record,
either a :class:`Document` (its ``--json-keys`` values, the bytes read, and ``file:line``) or a
:class:`Skipped` naming why (``malformed_json``, ``invalid_utf8``, ``missing_key``,
``not_text``, ``empty``, ``too_large``). Reading streams: memory does not grow with the input,
and a record (line, text block or text file) over ``max_doc_bytes`` is dropped while it is read.
A truncated or corrupt ``.gz``/``.zst`` is an :class:`InputError` naming the file, not a
shorter corpus.

For parallel preprocessing, :func:`plan_pieces` cuts the inputs into ordered :class:`Piece` s
(:func:`iter_piece` reads one): uncompressed JSONL at line starts and text blocks after blank
lines, by byte range, each range knowing its first line number so positions stay absolute;
compressed files, parquet and whole-file text are never split, and small files are grouped.
Reading the pieces in order yields exactly what :func:`iter_documents` yields for the files.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from megatron_vpmoe.utils.errors import InputError
from megatron_vpmoe.utils.inputs import PLAIN_TEXT_SUFFIXES
from megatron_vpmoe.utils.inputs import expand_inputs as expand_paths

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
TEXT_SUFFIXES = PLAIN_TEXT_SUFFIXES + (".txt.gz",)
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


def expand_inputs(patterns: Sequence[str]) -> List[Path]:
    """Files of every pattern (file, directory, glob) in a stable order, each once."""
    return expand_paths(patterns, SUFFIXES)


DEFAULT_MAX_DOC_BYTES = 8 << 20  # --max-doc-bytes: one record's input bytes (docs/data.md)
_READ = 1 << 20  # bytes per read
_ZSTD_INPUT = 64 << 10  # compressed bytes fed at a time: bounds one zstd output burst
TOO_LARGE = None  # a line longer than the limit: its bytes were dropped while reading


def _corrupt(path: Path, err: BaseException) -> InputError:
    kind = "zstd" if path.name.lower().endswith(".zst") else "gzip"
    detail = str(err) or type(err).__name__
    return InputError(f"{path}: corrupt or truncated {kind} data ({detail}); nothing was published")


def _gzip_chunks(path: Path, raw) -> Iterator[bytes]:
    import zlib

    try:
        with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
            while True:
                chunk = stream.read(_READ)
                if not chunk:
                    return
                yield chunk
    except (EOFError, OSError, zlib.error) as err:  # truncated, not gzip, bad CRC
        raise _corrupt(path, err) from None


def _zstd_chunks(path: Path, raw) -> Iterator[bytes]:
    """Every frame of a zstd file; a frame cut short is an error (zstandard's stream reader
    ends quietly at a truncated frame, and reads only the first of several frames)."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame, started = decompressor.decompressobj(), False
    try:
        while True:
            data = raw.read(_ZSTD_INPUT)
            if not data:
                break
            while data:
                if frame.eof:  # the next frame (concatenated files, pzstd)
                    frame, started = decompressor.decompressobj(), False
                started = True
                out = frame.decompress(data)
                data = frame.unused_data if frame.eof else b""
                if out:
                    yield out
    except zstandard.ZstdError as err:
        raise _corrupt(path, err) from None
    if started and not frame.eof:
        raise _corrupt(path, EOFError("the last frame ends early"))


def _raw_chunks(raw, start: int, end: Optional[int]) -> Iterator[bytes]:
    raw.seek(start)
    pos = start
    while True:
        want = _READ if end is None else min(_READ, end - pos)
        chunk = raw.read(want) if want > 0 else b""
        if not chunk:
            return
        pos += len(chunk)
        yield chunk


def _chunks_of(path: Path, raw, start: int = 0, end: Optional[int] = None) -> Iterator[bytes]:
    """The (decompressed) bytes of ``path`` in chunks; byte ranges of uncompressed files only."""
    name = path.name.lower()
    compressed = name.endswith((".gz", ".zst"))
    if compressed and (start or end is not None):
        raise ValueError(f"{path}: a compressed file cannot be read by byte range")
    if name.endswith(".gz"):
        return _gzip_chunks(path, raw)
    if name.endswith(".zst"):
        return _zstd_chunks(path, raw)
    return _raw_chunks(raw, start, end)


def _lines(path: Path, start: int = 0, end: Optional[int] = None, first_line: int = 1,
           max_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Iterator[tuple]:
    """``(line number, line bytes, input bytes consumed since the previous line)`` of the byte
    range ``[start, end)`` (uncompressed files only; ``start`` is a line start numbered
    ``first_line``); for compressed files the consumed bytes are compressed ones, so progress
    matches file sizes. A line longer than ``max_bytes`` comes as :data:`TOO_LARGE`: its bytes
    are dropped as they are read, so memory stays bounded by ``max_bytes`` plus one read."""
    with open(path, "rb") as raw:
        pending, oversize = b"", False  # the line so far; oversize: it passed max_bytes
        lineno, last_pos = first_line - 1, start
        for chunk in _chunks_of(path, raw, start, end):
            parts = chunk.split(b"\n")
            if len(parts) == 1:  # no line ends in this chunk
                if not oversize:
                    pending += chunk
                    if len(pending) > max_bytes:
                        pending, oversize = b"", True
                continue
            pos = raw.tell()
            lines = [TOO_LARGE if oversize else pending + parts[0]] + parts[1:-1]
            pending, oversize = parts[-1], False
            for i, line in enumerate(lines):
                lineno += 1
                consumed = pos - last_pos if i == len(lines) - 1 else 0
                if consumed:
                    last_pos = pos
                yield lineno, (TOO_LARGE if line is not TOO_LARGE and len(line) > max_bytes else line), consumed
            if len(pending) > max_bytes:
                pending, oversize = b"", True
        if pending or oversize:
            yield lineno + 1, TOO_LARGE if oversize else pending, raw.tell() - last_pos


def _pick(record: dict, keys: Sequence[str], where: str, nbytes: int, keep_empty: bool = False):
    fields = {}
    for key in keys:
        value = record
        for part in key.split("."):  # dotted paths reach into nested objects
            if not isinstance(value, dict) or part not in value:
                return Skipped(where, "missing_key", nbytes)
            value = value[part]
        if isinstance(value, str):
            if not keep_empty and not value.strip():
                return Skipped(where, "empty", nbytes)
        elif isinstance(value, list):
            if not value:
                return Skipped(where, "empty", nbytes)
        else:
            return Skipped(where, "not_text", nbytes)
        fields[key] = value
    return Document(where, fields, nbytes)


def _jsonl(path: Path, keys: Sequence[str], span: tuple = (0, None, 1),
           max_bytes: int = DEFAULT_MAX_DOC_BYTES, keep_empty: bool = False) -> Iterator[Union[Document, Skipped]]:
    carried = 0
    for lineno, line, nbytes in _lines(path, *span, max_bytes=max_bytes):
        where, nbytes, carried = f"{path}:{lineno}", nbytes + carried, 0
        if line is TOO_LARGE:
            yield Skipped(where, "too_large", nbytes)
            continue
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
        yield _pick(record, keys, where, nbytes, keep_empty)


def _parquet(path: Path, keys: Sequence[str], keep_empty: bool = False) -> Iterator[Union[Document, Skipped]]:
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
            yield _pick(record, keys, f"{path}:row{row}", per_row_bytes, keep_empty)


def _text(path: Path, key: str, blocks: bool, span: tuple = (0, None, 1),
          max_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Iterator[Union[Document, Skipped]]:
    if not blocks:
        with open(path, "rb") as raw:
            parts, held, oversize = [], 0, False
            for chunk in _chunks_of(path, raw):  # read to the end even when too large: a
                held += len(chunk)              # corrupt .gz is an error, not a skip
                oversize = oversize or held > max_bytes
                if not oversize:
                    parts.append(chunk)
            size = raw.tell()
        if oversize:
            yield Skipped(f"{path}:1", "too_large", size)
            return
        data = b"".join(parts)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            yield Skipped(f"{path}:byte{err.start}", "invalid_utf8", size)
            return
        yield Document(f"{path}:1", {key: text}, size) if text.strip() else Skipped(f"{path}:1", "empty", size)
        return
    block: List[bytes] = []
    start = consumed = held = 0  # held: the block's bytes; over max_bytes it is dropped
    for lineno, line, nbytes in _lines(path, *span, max_bytes=max_bytes):
        consumed += nbytes
        if line is TOO_LARGE or line.strip():
            if not block:
                start, held = lineno, 0
                block.append(b"")  # a block is open (its lines may be dropped)
            held += max_bytes + 1 if line is TOO_LARGE else len(line) + 1
            if held <= max_bytes:
                block.append(line)
            continue
        if block:
            yield _text_block(path, start, block, key, consumed, held > max_bytes)
            block, consumed = [], 0
    if block:
        yield _text_block(path, start, block, key, consumed, held > max_bytes)


def _text_block(path: Path, start: int, lines: List[bytes], key: str, nbytes: int, too_large: bool):
    if too_large:
        return Skipped(f"{path}:{start}", "too_large", nbytes)
    raw = b"\n".join(lines[1:])
    try:
        return Document(f"{path}:{start}", {key: raw.decode("utf-8")}, nbytes)
    except UnicodeDecodeError:
        return Skipped(f"{path}:{start}", "invalid_utf8", nbytes)


def iter_documents(files: Sequence[Path], json_keys: Sequence[str], *, txt_blocks: bool = False,
                   max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES, keep_empty: bool = False
                   ) -> Iterator[Union[Document, Skipped]]:
    """Every record of ``files`` in order (module docstring). ``.txt`` inputs give their text
    under the first json key; ``txt_blocks`` splits them at blank lines. A record of more than
    ``max_doc_bytes`` input bytes is skipped as ``too_large`` without being held in memory."""
    for path in files:
        yield from _file_records(Path(path), json_keys, txt_blocks, (0, None, 1), max_doc_bytes, keep_empty)


def _file_records(path: Path, json_keys: Sequence[str], txt_blocks: bool, span: tuple, max_bytes: int,
                  keep_empty: bool = False):
    """``keep_empty``: a JSONL/parquet field that is empty or whitespace-only is a document (as in
    Megatron-LM's preprocess_data.py), not skipped as ``empty``."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        return _parquet(path, json_keys, keep_empty)
    if name.endswith(TEXT_SUFFIXES):
        return _text(path, json_keys[0], txt_blocks, span, max_bytes)
    return _jsonl(path, json_keys, span, max_bytes, keep_empty)


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


def iter_piece(piece: Piece, json_keys: Sequence[str], *, txt_blocks: bool = False,
               max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES, keep_empty: bool = False
               ) -> Iterator[Union[Document, Skipped]]:
    """The records of one piece, positions numbered as in the whole file."""
    for seg in piece.segments:
        yield from _file_records(seg.path, json_keys, txt_blocks, (seg.start, seg.end, seg.first_line),
                                 max_doc_bytes, keep_empty)


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
