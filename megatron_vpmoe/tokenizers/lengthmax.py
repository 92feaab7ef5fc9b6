"""Length-MAX vocabulary builder (after Dong & Su, arXiv 2511.20849) and its export to a
native ``tokenizers`` model.

The vocabulary is grown greedily by the length-weighted objective *frequency x length* of a
candidate (the bytes it covers, i.e. what choosing it saves), not by frequency alone:

1. **Within units** (a unit is a word with its leading space, a run of punctuation, or one
   whitespace character): candidates are adjacent pairs of current tokens inside the distinct
   units, counted with the units' corpus frequencies. Each step takes the best
   ``count * bytes`` candidate; only the units containing it are re-read and only the counts
   of pairs that change are updated (a lazily re-scored max-heap; no recount of the corpus).
   This builds ``word_fraction`` of the learned vocabulary.
2. **Across units** (multi-word tokens): the corpus becomes one array of the current tokens
   (-1 between paragraphs: tokens may span spaces and single line breaks, never a blank
   line). Candidates are adjacent token pairs keyed ``a * 2**21 + b`` (an exact hash of the
   bigram of current tokens, so longer n-grams arise by merging merged tokens); after each
   merge only the pairs at the merged positions are recounted (numpy). Merged-away positions
   become tombstones in a linked array, compacted only now and then.

Every learned token is the merge of two earlier ones, recorded in order. Two encoders:

- ``merges`` (default): a ``tokenizers`` BPE model whose merge ranks are the learning order.
  It replays on new text exactly the segmentation the training text ended with, and runs at
  BPE speed (no per-word cache needed: no pre-tokenization regex).
- ``min-tokens``: a ``tokenizers`` Unigram with (almost) uniform scores, whose Viterbi search
  is the minimum-token segmentation (ties go to more frequent tokens). It compresses a little
  more, and with it ``overshoot`` x the requested tokens are learned and those covering the
  most bytes under that segmentation are kept (no merge graph to keep closed); its lattice
  search is slower than the merges encoder.

``max_token_chars`` caps a token's UTF-8 bytes and ``max_token_words`` its words. All 256
bytes are tokens (byte fallback: any UTF-8 input round-trips).
"""

from __future__ import annotations

import heapq
import math
import re
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_vpmoe.tokenizers.base import MIN_STUDENT_VOCAB, HFTokenizer, check_vocab_size
from megatron_vpmoe.tokenizers.bytes_map import bytes_to_piece
from megatron_vpmoe.tokenizers.specials import STUDENT_SPECIALS
from megatron_vpmoe.utils.errors import InputError

UNIT_RE = re.compile(r" ?[^\W\d_]+| ?\d+| ?[^\w\s]+| ?_+|\s")
PAIR_KEY = 1 << 21  # token ids stay below 2**21
DEFAULT_MAX_CHARS = 32
DEFAULT_MAX_WORDS = 4
DEFAULT_WORD_FRACTION = 0.7  # share of the learned (non-byte, non-special) vocab built within units


SEGMENT_END = "\n\n"  # tokens never span a blank line (paragraph); they may span single line breaks
_SEGMENT_RE = re.compile("(\n\n)")


def split_segments(text: str) -> List[str]:
    """Paragraph-sized pieces, the same split the exported pre-tokenizer makes (each
    non-overlapping blank-line match ends a piece)."""
    parts = _SEGMENT_RE.split(text)
    pieces = [parts[i] + (parts[i + 1] if i + 1 < len(parts) else "") for i in range(0, len(parts), 2)]
    return [p for p in pieces if p]


def split_units(text: str) -> List[str]:
    return UNIT_RE.findall(text)


WORD_RE = re.compile(r"[^\W_]+")


def _unit_words(raw: bytes) -> int:
    """Words in a piece: maximal runs of letters/digits."""
    return len(WORD_RE.findall(raw.decode("utf-8", errors="ignore")))


class _Vocab:
    """Byte tokens, then learned tokens, each the merge of two earlier ones (``merges`` keeps
    every rule in learning order; two rules may spell the same token, which is stored once)."""

    def __init__(self):
        self.pieces: List[bytes] = [bytes([b]) for b in range(256)]
        self.words: List[int] = [_unit_words(p) for p in self.pieces]
        self.counts: List[int] = [0] * 256
        self.lengths: List[int] = [1] * 256
        self.merges: Optional[List[Tuple[int, int]]] = []
        self._ids: Dict[bytes, int] = {p: i for i, p in enumerate(self.pieces)}

    def add(self, a: int, b: int) -> int:
        """The token for merging ``a`` and ``b`` (an existing id if the bytes are known)."""
        piece = self.pieces[a] + self.pieces[b]
        self.merges.append((a, b))
        if piece in self._ids:
            return self._ids[piece]
        return self.append(piece, _unit_words(piece), 0)

    def append(self, piece: bytes, words: int, count: int) -> int:
        """A new token (no merge rule recorded); returns its id."""
        self._ids[piece] = len(self.pieces)
        self.pieces.append(piece)
        self.words.append(words)
        self.counts.append(count)
        self.lengths.append(len(piece))
        return len(self.pieces) - 1

    def fits(self, a: int, b: int, max_chars: int, max_words: int | None) -> bool:
        return (self.lengths[a] + self.lengths[b] <= max_chars
                and (max_words is None or self.words[a] + self.words[b] <= max_words))


def _merge_within_units(vocab: _Vocab, unit_freq: Dict[str, int], budget: int, max_chars: int,
                        max_words: int, min_count: int, progress) -> List[List[int]]:
    units = list(unit_freq)
    freq = [unit_freq[u] for u in units]
    symbols = [list(u.encode("utf-8")) for u in units]
    pair_count: Counter = Counter()
    where: Dict[Tuple[int, int], set] = {}
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            pair_count[pair] += freq[i]
            where.setdefault(pair, set()).add(i)
    plen = vocab.lengths
    heap = [(-c * (plen[a] + plen[b]), a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    target = len(vocab.pieces) + budget
    while len(vocab.pieces) < target and heap:
        neg, a, b = heapq.heappop(heap)
        count = pair_count.get((a, b), 0)
        if count < min_count:
            continue
        score = count * (plen[a] + plen[b])
        if score != -neg:
            heapq.heappush(heap, (-score, a, b))
            continue
        if not vocab.fits(a, b, max_chars, max_words):
            continue
        before = len(vocab.pieces)
        new = vocab.add(a, b)
        changed = set()
        for i in list(where.get((a, b), ())):
            syms, f = symbols[i], freq[i]
            out, k = [], 0
            while k < len(syms):
                if k + 1 < len(syms) and syms[k] == a and syms[k + 1] == b:
                    out.append(new)
                    vocab.counts[new] += f
                    k += 2
                else:
                    out.append(syms[k])
                    k += 1
            for pair in zip(syms, syms[1:]):
                pair_count[pair] -= f
            for pair in set(zip(syms, syms[1:])) - set(zip(out, out[1:])):
                where[pair].discard(i)
            for pair in zip(out, out[1:]):
                pair_count[pair] += f
                where.setdefault(pair, set()).add(i)
                changed.add(pair)
            symbols[i] = out
        pair_count.pop((a, b), None)
        where.pop((a, b), None)
        for pair in changed:
            c = pair_count.get(pair, 0)
            if c >= min_count:
                heapq.heappush(heap, (-c * (plen[pair[0]] + plen[pair[1]]), pair[0], pair[1]))
        progress.update(len(vocab.pieces) - before)
    return symbols


def _pair_keys(seq: np.ndarray, nxt: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Keys ``a * 2**21 + b`` of the pairs (token at start, next live token), tokens only."""
    a, b = seq[starts], seq[nxt[starts]]
    ok = (a >= 0) & (b >= 0)
    return a[ok].astype(np.int64) * PAIR_KEY + b[ok]


def _merge_across_units(vocab: _Vocab, seq: np.ndarray, budget: int, max_chars: int,
                        max_words: int, min_count: int, progress) -> None:
    """Merges over the whole token array. Merged-away positions become tombstones (-2) linked
    over by ``nxt``/``prv``; the array is compacted only when a quarter of it is tombstones."""
    seq = seq.astype(np.int32)
    n = len(seq)
    nxt = np.minimum(np.arange(1, n + 1), n - 1)
    prv = np.maximum(np.arange(-1, n - 1), 0)
    tombstones = 0
    keys, counts = np.unique(_pair_keys(seq, nxt, np.arange(n - 1)), return_counts=True)
    pair_count: Dict[int, int] = dict(zip(keys.tolist(), counts.tolist()))
    plen = vocab.lengths

    def score(key: int, count: int) -> int:
        return count * (plen[key // PAIR_KEY] + plen[key % PAIR_KEY])

    heap = [(-score(k, c), k) for k, c in pair_count.items() if c >= min_count]
    heapq.heapify(heap)
    target = len(vocab.pieces) + budget
    while len(vocab.pieces) < target and heap:
        neg, key = heapq.heappop(heap)
        count = pair_count.get(key, 0)
        if count < min_count:
            continue
        s = score(key, count)
        if s != -neg:
            heapq.heappush(heap, (-s, key))
            continue
        a, b = divmod(key, PAIR_KEY)
        if not vocab.fits(a, b, max_chars, max_words):
            continue
        ia = np.flatnonzero(seq == a)
        nb = nxt[ia]
        hit = seq[nb] == b
        pos, nb = ia[hit], nb[hit]
        if a == b and len(pos) > 1:  # runs "a a a": merge left to right, never overlapping
            keep, taken = [], set()
            for p, q in zip(pos.tolist(), nb.tolist()):
                if p not in taken:
                    keep.append((p, q))
                    taken.add(q)
            pos = np.fromiter((p for p, _ in keep), dtype=np.int64, count=len(keep))
            nb = np.fromiter((q for _, q in keep), dtype=np.int64, count=len(keep))
        if len(pos) == 0:
            pair_count.pop(key, None)
            continue
        before = len(vocab.pieces)
        new = vocab.add(a, b)
        vocab.counts[new] += len(pos)
        delta = Counter()
        old = np.unique(np.concatenate([prv[pos], pos, nb]))
        k, c = np.unique(_pair_keys(seq, nxt, old), return_counts=True)
        for kk, cc in zip(k.tolist(), c.tolist()):
            delta[kk] -= cc
        after = nxt[nb]
        seq[pos] = new
        seq[nb] = -2
        nxt[pos] = after
        prv[after] = pos
        tombstones += len(nb)
        k, c = np.unique(_pair_keys(seq, nxt, np.unique(np.concatenate([prv[pos], pos]))),
                         return_counts=True)
        for kk, cc in zip(k.tolist(), c.tolist()):
            delta[kk] += cc
        for kk, d in delta.items():
            value = pair_count.get(kk, 0) + d
            if value > 0:
                pair_count[kk] = value
                if d > 0 and value >= min_count:
                    heapq.heappush(heap, (-score(kk, value), kk))
            else:
                pair_count.pop(kk, None)
        if tombstones * 4 > len(seq):
            seq = seq[seq != -2]
            n = len(seq)
            nxt = np.minimum(np.arange(1, n + 1), n - 1)
            prv = np.maximum(np.arange(-1, n - 1), 0)
            tombstones = 0
        progress.update(len(vocab.pieces) - before)


def _token_sequence(symbols: List[List[int]], occ: np.ndarray) -> np.ndarray:
    """The corpus as one token array: every unit occurrence spelled with its current tokens,
    -1 between lines."""
    lengths = np.array([len(s) for s in symbols] + [1], dtype=np.int64)
    flat = np.array([t for s in symbols for t in s] + [-1], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    occ = np.where(occ < 0, len(symbols), occ)
    counts = lengths[occ]
    starts = np.repeat(offsets[occ], counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.concatenate([flat[starts + within], [-1]])


def build_lengthmax_vocab(docs: Sequence[str], n_learned: int, *, max_token_chars: int = DEFAULT_MAX_CHARS,
                          max_token_words: int = DEFAULT_MAX_WORDS, word_fraction: float = DEFAULT_WORD_FRACTION,
                          min_count: int = 2, show_progress: bool = False) -> _Vocab:
    """Learn ``n_learned`` tokens beyond the 256 bytes (fewer if the corpus runs out)."""
    from megatron_vpmoe.utils.progress import Progress

    if max_token_chars < 2 or max_token_words < 1:
        raise InputError("max_token_chars must be >= 2 and max_token_words >= 1")
    # unit occurrences line by line; -1 separates lines (tokens never join lines)
    unit_id: Dict[str, int] = {}
    occurrences: List[int] = [-1]
    for doc in docs:
        for line in split_segments(doc):
            for unit in split_units(line):
                occurrences.append(unit_id.setdefault(unit, len(unit_id)))
            occurrences.append(-1)
    occ = np.asarray(occurrences, dtype=np.int64)
    unit_freq_arr = np.bincount(occ[occ >= 0], minlength=len(unit_id))
    unit_freq = {u: int(unit_freq_arr[i]) for u, i in unit_id.items()}

    vocab = _Vocab()
    n_within = int(round(n_learned * word_fraction)) if max_token_words > 1 else n_learned
    with Progress(n_learned, "length-max merges", "tok", enabled=show_progress) as bar:  # a bar, or a line every 10 s
        symbols = _merge_within_units(vocab, unit_freq, n_within, max_token_chars, max_token_words,
                                      min_count, bar)
        learned = len(vocab.pieces) - 256
        if learned < n_learned and max_token_words > 1:
            seq = _token_sequence(symbols, occ)
            _merge_across_units(vocab, seq, n_learned - learned, max_token_chars, max_token_words,
                                min_count, bar)
    return vocab


def prune_by_usage(vocab: _Vocab, docs: Sequence[str], target: int, rounds: int = 2,
                   sample_chars: int = 8_000_000) -> _Vocab:
    """Keep the ``target`` learned tokens that cover the most characters (usage x length) when
    the corpus is segmented with the minimum-token encoder; bytes are always kept. Each round
    re-segments with the survivors. The result has no merge rules (only ``min-tokens`` can
    encode with it)."""
    sample, total = [], 0
    for doc in docs:
        sample.append(doc[: sample_chars - total])
        total += len(sample[-1])
        if total >= sample_chars:
            break
    lines = [line for doc in sample for line in split_segments(doc)]
    for r in range(rounds):
        learned = len(vocab.pieces) - 256
        keep_n = target if r == rounds - 1 else target + (learned - target) // 2
        if learned <= keep_n:
            break
        backend = lengthmax_backend(vocab, encoder="min-tokens", with_specials=False)
        usage = np.zeros(len(vocab.pieces), dtype=np.int64)
        for enc in backend.encode_batch(lines, add_special_tokens=False):
            np.add.at(usage, enc.ids, 1)
        covered = usage * np.array(vocab.lengths)
        order = np.argsort(-covered[256:], kind="stable")[:keep_n] + 256
        pruned = _Vocab()
        for i in np.sort(order).tolist():
            pruned.append(vocab.pieces[i], vocab.words[i], int(usage[i]))
        pruned.counts[:256] = usage[:256].tolist()
        pruned.merges = None  # the merge graph is not closed any more
        vocab = pruned
    return vocab


ENCODERS = {"merges": "bpe-merges", "min-tokens": "unigram-min-tokens"}


def lengthmax_backend(vocab: _Vocab, encoder: str = "merges", with_specials: bool = True):
    """The vocabulary as a ``tokenizers`` model over byte-level characters, split only at blank
    lines: a BPE replaying the learned merges in order (``merges``) or a Unigram where every
    token costs 1 and a tiny frequency bonus breaks ties (``min-tokens``); specials appended."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    if encoder == "merges":
        if vocab.merges is None:
            raise InputError("lengthmax: a pruned vocabulary has no closed merge graph; encode it "
                             "with encoder='min-tokens'")
        model = models.BPE({bytes_to_piece(p): i for i, p in enumerate(vocab.pieces)},
                           [(bytes_to_piece(vocab.pieces[a]), bytes_to_piece(vocab.pieces[b]))
                            for a, b in vocab.merges])
    elif encoder == "min-tokens":
        top = max(vocab.counts) or 1
        scores = [-1.0 + 1e-6 * math.log1p(c) / math.log1p(top) for c in vocab.counts]
        model = models.Unigram([(bytes_to_piece(p), s) for p, s in zip(vocab.pieces, scores)],
                               unk_id=None, byte_fallback=False)
    else:
        raise InputError(f"lengthmax: unknown encoder {encoder!r} (choose from {', '.join(ENCODERS)})")
    backend = RustTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SEGMENT_END), behavior="merged_with_previous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    if with_specials:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in STUDENT_SPECIALS])
    return backend


def train_lengthmax(docs: Sequence[str], vocab_size: int, *, show_progress: bool = False,
                    name: str = "lengthmax", encoder: str = "merges", max_token_chars: int = DEFAULT_MAX_CHARS,
                    max_token_words: int = DEFAULT_MAX_WORDS, word_fraction: float = DEFAULT_WORD_FRACTION,
                    min_count: int = 2, overshoot: float | None = None, prune_rounds: int = 1) -> HFTokenizer:
    """Train a Length-MAX tokenizer of ``vocab_size`` ids (bytes, learned tokens, specials).
    ``overshoot`` (``min-tokens`` only, default 1.25) learns that many times the tokens and
    prunes back by usage."""
    check_vocab_size("lengthmax", vocab_size, MIN_STUDENT_VOCAB)
    if encoder not in ENCODERS:
        raise InputError(f"lengthmax: unknown encoder {encoder!r} (choose from {', '.join(ENCODERS)})")
    if overshoot is None:
        overshoot = 1.25 if encoder == "min-tokens" else 1.0
    if encoder == "merges" and overshoot != 1:
        raise InputError("lengthmax: overshoot (learn more, prune back) needs encoder='min-tokens'; "
                         "pruning would break the merges encoder's merge graph")
    n_learned = vocab_size - 256 - len(STUDENT_SPECIALS)
    vocab = build_lengthmax_vocab(docs, int(n_learned * overshoot),
                                  max_token_chars=max_token_chars, max_token_words=max_token_words,
                                  word_fraction=word_fraction, min_count=min_count,
                                  show_progress=show_progress)
    if overshoot > 1:
        vocab = prune_by_usage(vocab, docs, n_learned, rounds=prune_rounds)
    multiword = sum(1 for w in vocab.words if w > 1)
    return HFTokenizer("lengthmax", name, lengthmax_backend(vocab, encoder), {
        "max_token_chars": max_token_chars, "max_token_words": max_token_words,
        "word_fraction": word_fraction, "multiword_tokens": multiword,
        "requested_vocab_size": vocab_size, "encoder": ENCODERS[encoder]})
