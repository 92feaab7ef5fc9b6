"""Pruned teacher tokenizer: o200k restricted to the tokens a corpus uses most, with the BPE
merge graph kept closed so the restricted BPE stays valid, plus the student -> teacher id map.

Kept always: the 256 byte tokens (any input encodes), tokens made only of digits or operator
characters, and the Harmony special tokens. Then tokens by descending usage on the corpus;
each one brings its merge parents (recursively), i.e. the two tokens whose merge produces it
under the teacher's own merge order, so every kept token stays reachable. Kept tokens keep
their relative teacher order, so the pruned BPE merges exactly like the teacher's among them.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_vpmoe.tokenizers.specials import STUDENT_SPECIALS
from megatron_vpmoe.tokenizers.tiktoken_variant import TiktokenTokenizer
from megatron_vpmoe.utils.errors import InputError

_ALWAYS_KEEP = re.compile(rb"^ ?(?:[0-9]{1,3}|[-+*/=<>!&|^%~]{1,3})\Z")


def merge_parents(token: bytes, ranks: Dict[bytes, int]) -> Tuple[bytes, ...]:
    """The pieces the teacher's BPE holds just before it forms ``token``: run BPE on the
    token's bytes with only lower-ranked merges (two pieces for every reachable token)."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return tuple(parts) if len(parts) > 1 else ()


def close_under_parents(kept: set, token: bytes, ranks: Dict[bytes, int], cache: dict) -> List[bytes]:
    """``token`` and its not-yet-kept ancestors (what keeping it costs)."""
    new, stack = [], [token]
    seen = set()
    while stack:
        t = stack.pop()
        if t in kept or t in seen:
            continue
        seen.add(t)
        new.append(t)
        if t not in cache:
            cache[t] = merge_parents(t, ranks)
        stack.extend(cache[t])
    return new


def prune_teacher(docs: Sequence[str], vocab_size: int, *, show_progress: bool = False,
                  name: str = "pruned", ranks_path: Optional[str] = None) -> TiktokenTokenizer:
    from tqdm import tqdm

    from megatron_vpmoe.tokenizers.corpus import chunk_documents

    teacher = TiktokenTokenizer.harmony(ranks_path)
    ranks = teacher.ranks
    by_rank = {r: t for t, r in ranks.items()}
    bytes_tokens = {t for t in ranks if len(t) == 1}
    always = bytes_tokens | {t for t in ranks if _ALWAYS_KEEP.match(t)}
    minimum = len(bytes_tokens) + len(STUDENT_SPECIALS)
    if vocab_size < minimum:
        raise InputError(f"--vocab-size {vocab_size} is smaller than the base alphabet of pruned "
                         f"(256 byte tokens + {len(STUDENT_SPECIALS)} special tokens = {minimum})")
    budget = vocab_size - len(STUDENT_SPECIALS)
    usage = np.zeros(max(ranks.values()) + 1, dtype=np.int64)
    chunks = list(chunk_documents(docs, 65536))
    for start in tqdm(range(0, len(chunks), 64), desc="counting teacher tokens", disable=not show_progress):
        for ids in teacher.encode_batch(chunks[start:start + 64]):
            usage += np.bincount(np.asarray(ids, dtype=np.int64), minlength=len(usage))[: len(usage)]
    kept: set = set()
    cache: dict = {}
    # bytes first, then digits/operators (by usage), then everything used, by usage
    always_order = sorted(always, key=lambda t: (len(t) > 1, -usage[ranks[t]], ranks[t]))
    used = [by_rank[r] for r in np.argsort(-usage, kind="stable").tolist() if usage[r] > 0 and r in by_rank]
    for token in always_order + used:
        if len(kept) >= budget:
            break
        if token in kept:
            continue
        add = close_under_parents(kept, token, ranks, cache)
        if len(kept) + len(add) <= budget:
            kept.update(add)
    kept_sorted = sorted(kept, key=ranks.__getitem__)
    new_ranks = {t: i for i, t in enumerate(kept_sorted)}
    teacher_ids = [ranks[t] for t in kept_sorted]
    teacher_special = teacher.special_tokens
    specials = {}
    for token in STUDENT_SPECIALS:
        specials[token] = len(new_ranks) + len(specials)
        teacher_ids.append(teacher_special.get(token, -1))  # <|pad|> has no teacher token: -1
    missing_closure = [t for t in kept_sorted if any(p not in new_ranks for p in cache.get(t, ()))]
    if missing_closure:
        raise AssertionError(f"merge graph not closed for {len(missing_closure)} tokens")
    covered = float(usage[[ranks[t] for t in kept_sorted]].sum() / max(1, usage.sum()))
    tok = TiktokenTokenizer("pruned", name, new_ranks, teacher.pat_str, specials, {
        "teacher": "o200k_harmony", "teacher_usage_covered": round(covered, 6),
        "kept_always": len(always & kept)}, n_vocab=len(new_ranks) + len(specials))
    tok.teacher_ids = teacher_ids
    return tok


__all__ = ["prune_teacher", "merge_parents"]
