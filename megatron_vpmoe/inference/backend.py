"""The one model-backend interface: a model and its tokenizer that score log-probs and generate, batched, on token ids.

A :class:`Backend` holds a ``transformers`` tokenizer (``self.tokenizer``) and answers:

* ``score(sequences, starts)`` - ``log p(seq[j] | seq[:j])`` for ``j >= start`` and whether each
  token is the model's argmax, batched longest first (``batch_size`` rows per forward), built on
  the one primitive ``forward_logits`` and the one log-prob helper
  (:func:`megatron_vpmoe.inference.logprobs.token_logprobs`);
* ``generate(prompts, params)`` - sampled or greedy continuations with the KV cache, each
  token's log-prob under the model, cut at the first stop id (:class:`Sampled`).

Both take a ``cancelled`` event: the call stops at its next forward once it is set
(:class:`Cancelled`). Implementations: :class:`~megatron_vpmoe.inference.native.NativeBackend`
(this project's ``VpmoeModel``) and :class:`~megatron_vpmoe.inference.hf.HFBackend` (a Hugging Face
causal LM); :func:`megatron_vpmoe.inference.open_backend` picks one for a path.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from megatron_vpmoe.inference.logprobs import token_logprobs
from megatron_vpmoe.tokenizers.specials import HARMONY_MARKERS
from megatron_vpmoe.utils.errors import InputError


@dataclass
class SampleParams:
    """Sampling parameters shared by every row of one ``generate`` call (the server's batch key).
    ``temperature <= 0`` is greedy; ``stop_strings`` lets a backend stop a row early where it can
    (callers still cut the text); ``logprobs=False`` skips computing the sampled tokens' log-probs."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_ids: tuple = ()
    stop_strings: tuple = ()
    logprobs: bool = True

    def key(self) -> tuple:
        return (self.max_new_tokens, self.temperature, self.top_p, self.seed, self.stop_ids,
                self.stop_strings, self.logprobs)


@dataclass
class Sampled:
    tokens: list  # generated ids, without the stop token
    logprobs: list  # log-prob of each generated id under the model (untempered); [] when not asked
    finish_reason: str  # "stop" | "length"


class Cancelled(Exception):
    """Every request of a backend call went away; the call stopped at a forward step."""


@contextlib.contextmanager
def stop_when(model, cancelled: Optional[threading.Event]):
    """Stop ``model``'s work (raise :class:`Cancelled` at its next forward call) once
    ``cancelled`` is set; sampling loops call the model once per token, so a generation ends
    within one step of its last client leaving."""
    if cancelled is None or model is None:
        yield
        return

    def check(*_):
        if cancelled.is_set():
            raise Cancelled("every request of this batch was cancelled")

    handle = model.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def truncate_at_stop(tokens, logprobs, stop_ids, max_new_tokens) -> Sampled:
    """A row of new tokens cut before its first stop id; ``length`` when it ran out of tokens."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return Sampled(list(tokens[:i]), list(logprobs[:i]), "stop")
    reason = "length" if len(tokens) >= max_new_tokens else "stop"
    return Sampled(list(tokens), list(logprobs), reason)


def hf_token_id(tokenizer, token: str) -> Optional[int]:
    """The id of ``token`` as one token of a ``transformers`` tokenizer, or None."""
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == tokenizer.unk_token_id else tid


def speaks_harmony(tokenizer) -> bool:
    """Whether a ``transformers`` tokenizer holds the Harmony chat tokens as single tokens."""
    return all(hf_token_id(tokenizer, t) is not None for t in HARMONY_MARKERS)


class Backend:
    """Tokenizer-side behaviour over ``self.tokenizer`` and batched scoring over
    ``forward_logits``; implementations supply ``forward_logits`` and ``generate``."""

    name: str = "backend"
    model_id: str = "model"
    path: Optional[str] = None
    tokenizer = None
    model = None
    max_length: int = 2048  # longest input the model is asked to read
    batch_size: int = 8  # rows per forward in ``score``
    eos_ids: Tuple[int, ...] = ()
    vocab_size: Optional[int] = None  # token ids in requests must be below it
    on_scored: Optional[Callable[[int], None]] = None  # progress hook: called with the rows of each scoring forward
    _lock = contextlib.nullcontext()  # implementations hold a lock: torch's RNG is seeded per call

    # ---- tokenizer -------------------------------------------------------------------------
    def encode(self, text: str, specials: bool = False) -> List[int]:
        """Ids of ``text``: special-token strings in it are plain text (evaluation data, message
        contents) unless ``specials`` (a prompt already in the model's own format)."""
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=not specials)

    def encode_with_offsets(self, text: str, specials: bool = False) -> Tuple[list, list]:
        """Ids (as :meth:`encode`) and each token's start offset in ``text``."""
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                                 split_special_tokens=not specials)
            return list(enc["input_ids"]), [s for s, _ in enc["offset_mapping"]]
        ids = self.encode(text, specials)
        return ids, self.offsets(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def offsets(self, ids: Sequence[int]) -> list:
        """Character offset where each token starts in ``decode(ids)``."""
        return [len(self.decode(ids[:i])) for i in range(len(ids))]

    def token_id(self, token: str) -> Optional[int]:
        return hf_token_id(self.tokenizer, token)

    def max_token_chars(self) -> int:
        """An upper bound on the characters one token stands for: a text of more than
        ``n * max_token_chars()`` characters has more than ``n`` tokens, known without encoding it."""
        if getattr(self, "_max_token_chars", None) is None:
            # vocabulary strings spell a token with at least one character per decoded
            # character (byte-level BPE: one per byte; SentencePiece: one per piece character)
            self._max_token_chars = max([len(t) for t in self.tokenizer.get_vocab()] + [1])
        return self._max_token_chars

    @property
    def prefix_token_id(self) -> int:
        """The token put before a document scored from its first token (BOS, else EOS)."""
        for cand in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if cand is not None:
                return int(cand)
        raise InputError(f"{self.path}: the tokenizer has neither a BOS nor an EOS token to start documents")

    @property
    def is_harmony(self) -> bool:
        return speaks_harmony(self.tokenizer)

    def chat_template(self, messages: list) -> str:
        """Messages rendered by the tokenizer's own chat template, ending in the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"model {self.model_id} has no chat template and is not a Harmony model")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _set_tokenizer(self, tokenizer, eos=None) -> None:
        """Adopt ``tokenizer``; end-of-sequence ids are ``eos`` (the model's, when it names them)
        or the tokenizer's."""
        self.tokenizer = tokenizer
        eos = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())

    # ---- model -----------------------------------------------------------------------------
    def forward_logits(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, S]`` right-padded (``lengths [B]`` real tokens) -> logits ``[B, S, V]``."""
        raise NotImplementedError

    def generate(self, prompts: list, params: SampleParams,
                 cancelled: Optional[threading.Event] = None) -> List[Sampled]:
        """One batched call; ``prompts`` are token-id lists; one :class:`Sampled` each.
        Raises :class:`Cancelled` soon after ``cancelled`` is set."""
        raise NotImplementedError

    def _forward_batches(self, sequences: Sequence[Sequence[int]], rows: int, cancelled=None):
        """``(indices, logits)`` per forward over ``rows`` sequences at a time, longest first:
        each sequence but its last token, right-padded; sequences of one token are skipped."""
        order = sorted((i for i in range(len(sequences)) if len(sequences[i]) > 1), key=lambda i: -len(sequences[i]))
        with self._lock, stop_when(self.model, cancelled):
            for b in range(0, len(order), rows):
                idx = order[b: b + rows]
                lengths = torch.tensor([len(sequences[i]) - 1 for i in idx])
                batch = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
                for row, i in enumerate(idx):
                    batch[row, : len(sequences[i]) - 1] = torch.tensor(sequences[i][:-1], dtype=torch.long)
                yield idx, self.forward_logits(batch, lengths)
                if self.on_scored is not None:
                    self.on_scored(len(idx))

    @staticmethod
    def _check_starts(sequences, starts) -> None:
        if len(sequences) != len(starts):
            raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
        for i, (seq, start) in enumerate(zip(sequences, starts)):
            if not 1 <= start <= len(seq):
                raise ValueError(f"starts[{i}] = {start} must be between 1 and len(sequence) = {len(seq)}")

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int],
              cancelled: Optional[threading.Event] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """For each sequence, ``log p(seq[j] | seq[:j])`` and whether ``seq[j]`` is the argmax,
        for ``j`` in ``[start, len(seq))`` (``start >= 1``); the last token is only a target.
        Callers keep inputs within what the model reads (``max_length``)."""
        self._check_starts(sequences, starts)
        empty = (torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        out: List[Tuple[torch.Tensor, torch.Tensor]] = [empty] * len(sequences)  # one token: nothing to score
        for idx, logits in self._forward_batches(sequences, self.batch_size, cancelled):
            for row, i in enumerate(idx):
                seq, start = sequences[i], starts[i]
                row_logits = logits[row, start - 1: len(seq) - 1].float()
                targets = torch.tensor(seq[start:], dtype=torch.long)
                out[i] = (token_logprobs(row_logits, targets), row_logits.argmax(-1) == targets)
        return out

    @torch.no_grad()  # not inference_mode: the native model's RoPE table cache reads tensors' version counters
    def nll_sums(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], rows: Optional[int] = None,
                 cancelled: Optional[threading.Event] = None, progress=None) -> List[float]:
        """``-sum log p(seq[j] | seq[:j])`` over ``j`` in ``[start, len(seq))`` per sequence, as
        :meth:`score` computes it (float32 log-probs, summed in float64), ``rows`` sequences per
        forward (default ``batch_size``). Only the sums are kept, so memory is one batch's logits
        however many sequences there are; ``progress(n)`` is called with each batch's size. A batch
        is scored in one call (positions outside a row's targets are not scored), not row by row."""
        self._check_starts(sequences, starts)
        out = [0.0] * len(sequences)
        for idx, logits in self._forward_batches(sequences, rows or self.batch_size, cancelled):
            targets = torch.full(logits.shape[:2], -1, dtype=torch.long)  # -1: not a target
            for row, i in enumerate(idx):
                seq, start = sequences[i], starts[i]
                targets[row, start - 1: len(seq) - 1] = torch.tensor(seq[start:], dtype=torch.long)
            sums = token_logprobs(logits, targets).double().sum(-1).neg_().tolist()
            for row, i in enumerate(idx):
                out[i] = sums[row]
            del logits
            if progress is not None:
                progress(len(idx))
        return out

    def describe(self) -> dict:
        return {"backend": self.name, "path": self.path, "max_length": self.max_length}
