"""Byte <-> printable-character maps of byte-level vocabularies, and raw bytes of HF pieces."""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, List


@lru_cache(maxsize=1)
def byte_to_char() -> Dict[int, str]:
    """The byte-level alphabet of GPT-2 / HF ``tokenizers`` ``ByteLevel``: printable Latin-1
    bytes stand for themselves, the other bytes for code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def char_to_byte() -> Dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def bytes_to_piece(raw: bytes) -> str:
    table = byte_to_char()
    return "".join(table[b] for b in raw)


def piece_bytes_table(backend, vocab_size: int) -> List[bytes]:
    """Raw bytes of every id of a ``tokenizers.Tokenizer`` (b"" for specials and holes):
    byte-level pieces map through the alphabet; SentencePiece pieces map ``\u2581`` to a space
    and ``<0xNN>`` to one byte."""
    out = [b""] * vocab_size
    specials = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    c2b = char_to_byte()
    for piece, i in backend.get_vocab(with_added_tokens=False).items():
        if i in specials or i >= vocab_size:
            continue
        if all(c in c2b for c in piece) and "ByteLevel" in repr(backend.decoder):
            out[i] = bytes(c2b[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out[i] = bytes([int(piece[3:5], 16)])
        else:
            out[i] = piece.replace("\u2581", " ").encode("utf-8")
    return out
