"""``--max-memory``: each worker's memory budget -> the largest record it may tokenize.

Preprocessing memory is bounded by construction except for one record's tokenization, which
costs a multiple of its size (measured peak RSS per input byte of one document: about 11 with
the gigatoken engine, mostly the id list, and 130 with HF ``tokenizers``; :data:`BYTES_PER_BYTE`
keeps a margin). Everything else is fixed: a worker's interpreter, tokenizers and the engine's
64 MiB encode cache (:data:`WORKER_MB`) and one batch of at most :data:`CHUNK_BYTES` of input
besides its largest record; the parent holds the same plus one length per document. :func:`plan`
returns the record limit that keeps a worker within the budget: the smaller of
``--max-doc-bytes`` and what fits, so a longer record is skipped as ``too_large`` (counted, with
its position) instead of growing the process. The limit depends on the budget and the engines,
never on ``--workers``; a budget too small for the fixed part is an :class:`InputError`.
"""

from __future__ import annotations

from typing import Dict, Tuple

from megatron_vpmoe.utils.errors import InputError

DEFAULT_MAX_MEMORY_MB = 512  # per worker
WORKER_MB = 200
CHUNK_BYTES = 256 << 10  # input bytes of one tokenizer batch (besides its largest record)
MIN_DOC_BYTES = 64 << 10
BYTES_PER_BYTE = {"gigatoken": 16, "tokenizers": 140}


def plan(max_memory_mb: int, max_doc_bytes: int, engines: Dict[str, str]) -> Tuple[int, str]:
    """``(record limit in bytes, note)``; the note says why the limit is below ``max_doc_bytes`` ("" if not)."""
    per_byte = max(BYTES_PER_BYTE["gigatoken" if e == "gigatoken" else "tokenizers"] for e in engines.values())
    fits = (max_memory_mb - WORKER_MB) * (1 << 20) // per_byte - CHUNK_BYTES
    if fits < MIN_DOC_BYTES:
        need = WORKER_MB + ((MIN_DOC_BYTES + CHUNK_BYTES) * per_byte >> 20) + 1
        raise InputError(f"--max-memory {max_memory_mb} MB is too small for a worker (needs at least {need} MB)")
    if fits >= max_doc_bytes:
        return max_doc_bytes, ""
    slow = sorted(name for name, e in engines.items() if e != "gigatoken")
    why = (f"{', '.join(slow)}: no gigatoken engine, ~{per_byte} B per input byte" if slow
           else f"~{per_byte} B per input byte")
    return fits, (f"records over {fits / (1 << 20):.1f} MiB are skipped as too_large to keep each worker "
                  f"within --max-memory {max_memory_mb} MB ({why})")
