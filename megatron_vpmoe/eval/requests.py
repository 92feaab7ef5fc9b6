"""What evaluation tasks ask of a backend, in text: continuation log-likelihoods, the NLL of documents, greedy completions.

Built on the backend's batched ``score`` and ``generate`` (:class:`megatron_vpmoe.inference.Backend`);
inputs are kept within the model's ``max_length`` here, by truncating from the left.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

from megatron_vpmoe.inference.backend import Backend, SampleParams
from megatron_vpmoe.utils.errors import InputError


def split_request(backend: Backend, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """Token ids of ``context`` and of ``continuation`` as it is tokenized after it.

    Trailing spaces of the context move to the continuation (so " Paris" is one token),
    and the continuation's ids are read off the joint encoding, so the split matches what
    the model sees. An empty context becomes the prefix (document-start) token.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    context = stripped
    whole = backend.encode(context + continuation)
    ctx = backend.encode(context) if context else []
    if whole[: len(ctx)] != ctx:  # the boundary merged into one token: encode separately
        whole = ctx + backend.encode(continuation)
    cont = whole[len(ctx):]
    if not cont:
        raise InputError(f"continuation {continuation!r} encodes to no tokens")
    if not ctx:
        ctx = [backend.prefix_token_id]
    return ctx, cont


def loglikelihood(backend: Backend, requests: Sequence[Tuple[str, str]]) -> List[Tuple[float, bool]]:
    """``(sum log p(continuation | context), continuation is the greedy completion)`` per request."""
    seqs, starts = [], []
    for context, continuation in requests:
        ctx, cont = split_request(backend, context, continuation)
        seq = (ctx + cont)[-(backend.max_length + 1):]  # left-truncate the context
        seqs.append(seq)
        # a continuation longer than the window is scored on its last max_length tokens
        starts.append(max(1, len(seq) - len(cont)))
    return [(float(lp.sum()), bool(g.all())) for lp, g in backend.score(seqs, starts)]


def document_windows(backend: Backend, ids: Sequence[int], window: Optional[int] = None) -> List[List[int]]:
    """How a document is scored: the prefix (document-start) token, then the document's tokens, cut
    into non-overlapping windows of ``window`` (default ``max_length``) targets; each window is
    read with the token before it as its first input, so every token is scored once, given the
    tokens before it in its own window only (no context carried across windows)."""
    window = window or backend.max_length
    seq = [backend.prefix_token_id] + list(ids)
    return [seq[begin - 1: begin + window] for begin in range(1, len(seq), window)]


# one scoring forward's size: at most this many tokens, and logits (tokens x vocab float32) of at most
# this many bytes (a 200k vocabulary gets fewer rows), at least one window
SCORE_TOKENS = 4096
SCORE_LOGITS_BYTES = 256 << 20


def score_rows(backend: Backend, window: int) -> int:
    """Windows of ``window`` tokens per forward when scoring documents: as many as
    :data:`SCORE_TOKENS` and :data:`SCORE_LOGITS_BYTES` allow, at least one."""
    vocab = backend.vocab_size or 1
    return max(1, min(SCORE_TOKENS // window, SCORE_LOGITS_BYTES // (4 * window * vocab)))


def document_nll(backend: Backend, windows: Sequence[Sequence[int]], progress=None) -> float:
    """Summed NLL (nats) of every target of ``windows`` (:func:`document_windows`), in forwards of
    :func:`score_rows` windows, keeping only per-window sums (memory is one forward's, whatever the
    text's length); ``progress(n)`` gets the windows done after each forward."""
    if not windows:
        return 0.0
    rows = score_rows(backend, max(len(w) for w in windows))
    return math.fsum(backend.nll_sums(windows, [1] * len(windows), rows=rows, progress=progress))


def greedy_completions(backend: Backend, prompts: Sequence[str], max_new_tokens: int,
                       stop: Sequence[str] = ()) -> List[str]:
    """Greedy completions of text prompts (KV-cached ``generate``, ``batch_size`` at a time),
    ending at the end-of-sequence token and cut before the first stop string."""
    keep = max(1, backend.max_length - max_new_tokens)
    rows = [(backend.encode(p) or [backend.prefix_token_id])[-keep:] for p in prompts]
    params = SampleParams(max_new_tokens, temperature=0.0, stop_ids=tuple(backend.eos_ids),
                          stop_strings=tuple(stop), logprobs=False)
    texts = []
    for b in range(0, len(rows), backend.batch_size):
        for sample in backend.generate(rows[b: b + backend.batch_size], params):
            text = backend.decode(sample.tokens)
            cut = min((text.find(s) for s in stop if s in text), default=len(text))
            texts.append(text[:cut])
    return texts
