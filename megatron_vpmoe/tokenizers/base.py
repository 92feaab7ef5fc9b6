"""The one tokenizer interface every variant implements, plus the variant backed by a HF
``tokenizers`` model (bpe, unigram, lengthmax) and saving to a directory
(:func:`megatron_vpmoe.tokenizers.load` reads one back).

A tokenizer directory holds ``vpmoe_tokenizer.json`` (kind + metadata), the variant's own
artefacts, and ``tokenizer.json`` (HF ``tokenizers`` format) so that
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)`` loads every variant.

One rule for special-token strings inside text (``<|endoftext|>``, ``<|start|>``...): they
become their special ids, in :meth:`Tokenizer.encode`, in the exported HF tokenizer
(``to_hf``/``AutoTokenizer``) and in Megatron-LM's own ``HuggingFaceTokenizer``, so the ids a
model is trained on are the ids it sees through transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from megatron_vpmoe.tokenizers.specials import BOS_TOKEN, EOD_TOKEN, HARMONY_TOKENS, PAD_TOKEN, STUDENT_SPECIALS
from megatron_vpmoe.utils.atomic import atomic_directory
from megatron_vpmoe.utils.errors import InputError

METADATA_FILE = "vpmoe_tokenizer.json"
HF_FILE = "tokenizer.json"
KINDS = ("harmony", "bpe", "unigram", "lengthmax", "pruned", "tiktoken", "sentencepiece")
# a student vocabulary holds at least the 256 byte tokens and the specials
MIN_STUDENT_VOCAB = 256 + len(STUDENT_SPECIALS)


def check_vocab_size(kind: str, vocab_size: int, minimum: int = MIN_STUDENT_VOCAB) -> None:
    if vocab_size < minimum:
        raise InputError(f"--vocab-size {vocab_size} is smaller than the base alphabet of {kind} "
                         f"(256 byte tokens + {len(STUDENT_SPECIALS)} special tokens = {minimum})")


def pad_to_multiple(n: int, multiple: int) -> int:
    if multiple <= 0:
        raise ValueError(f"multiple must be > 0, got {multiple}")
    return -(-n // multiple) * multiple


class Tokenizer:
    """Common interface: ``encode``/``encode_batch``/``decode``, sizes, special ids, ``save``,
    ``to_hf``. Subclasses implement the ``_``-prefixed hooks."""

    kind: str = ""
    eod_token: str = EOD_TOKEN  # the end-of-document token's string

    def __init__(self, name: str, special_tokens: Dict[str, int], metadata: Optional[dict] = None,
                 *, required_specials=(EOD_TOKEN,) + HARMONY_TOKENS):
        self.name = name
        self._special = dict(special_tokens)
        self.metadata = dict(metadata or {})
        for required in required_specials:
            if required not in self._special:
                raise InputError(f"tokenizer {name!r} lacks the special token {required}")

    # ---- sizes and specials ------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids including special tokens (max id + 1)."""
        raise NotImplementedError

    def padded_vocab_size(self, multiple: int = 128) -> int:
        return pad_to_multiple(self.vocab_size, multiple)

    @property
    def special_tokens(self) -> Dict[str, int]:
        return dict(self._special)

    def token_to_id(self, special: str) -> int:
        try:
            return self._special[special]
        except KeyError:
            raise KeyError(f"tokenizer {self.name!r} ({self.kind}) has no special token {special!r}") from None

    @property
    def eod_id(self) -> int:
        return self._special[self.eod_token]

    @property
    def bos_id(self) -> int:
        return self._special.get(BOS_TOKEN, self.eod_id)

    @property
    def pad_id(self) -> int:
        return self._special.get(PAD_TOKEN, self.eod_id)

    # ---- encode / decode ---------------------------------------------------------------
    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        """New lists, one per text, that the caller owns (preprocessing appends EOD in place)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: List[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one non-special token (b"" for specials)."""
        raise NotImplementedError

    def token_byte_lengths(self) -> List[int]:
        """UTF-8 byte length of every id (0 for specials and unused ids)."""
        special = set(self._special.values())
        return [0 if i in special else len(self.token_bytes(i)) for i in range(self.vocab_size)]

    # ---- persistence -------------------------------------------------------------------
    def hf_tokenizer(self):
        """This tokenizer as a ``tokenizers.Tokenizer`` (what ``tokenizer.json`` holds)."""
        raise NotImplementedError

    def _save_artefacts(self, directory: Path) -> dict:
        """Write the variant's own files into ``directory``; return extra metadata."""
        return {}

    def save(self, directory, *, overwrite: bool = True) -> Path:
        directory = Path(directory)
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            tmp.chmod(0o755)
            extra = self._save_artefacts(tmp)
            self.hf_tokenizer().save(str(tmp / HF_FILE))
            meta = {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size,
                    "special_tokens": self._special, **self.metadata, **extra}
            (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
            _write_hf_config(tmp, self)
        return directory

    def to_hf(self):
        """A ``transformers.PreTrainedTokenizerFast`` with the same ids as :meth:`encode`."""
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(
            tokenizer_object=self.hf_tokenizer(), eos_token=self.eod_token,
            bos_token=BOS_TOKEN if BOS_TOKEN in self._special else self.eod_token,
            pad_token=PAD_TOKEN if PAD_TOKEN in self._special else self.eod_token,
            additional_special_tokens=[t for t in HARMONY_TOKENS if t in self._special],
            clean_up_tokenization_spaces=False)
        hf.name_or_path = self.name
        return hf

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} kind={self.kind} vocab_size={self.vocab_size}>"


def _write_hf_config(directory: Path, tok: Tokenizer) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eod_token,
              "bos_token": BOS_TOKEN if BOS_TOKEN in tok._special else tok.eod_token,
              "pad_token": PAD_TOKEN if PAD_TOKEN in tok._special else tok.eod_token,
              "additional_special_tokens": [t for t in HARMONY_TOKENS if t in tok._special],
              "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


class HFTokenizer(Tokenizer):
    """A variant whose encoder is a HF ``tokenizers`` model (bpe, unigram, lengthmax)."""

    def __init__(self, kind: str, name: str, backend, metadata: Optional[dict] = None,
                 eod_token: Optional[str] = None):
        self.kind = kind
        self._backend = backend
        # special-token strings inside text are their special ids (the module's one rule)
        backend.encode_special_tokens = False
        specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        if eod_token is None:
            super().__init__(name, specials, metadata)
        else:  # a plain HF tokenizer.json directory: no Harmony tokens required
            if eod_token not in specials:
                raise InputError(f"{name}: no end-of-document special token ({eod_token})")
            self.eod_token = eod_token
            super().__init__(name, specials, metadata, required_specials=(eod_token,))
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self.directory: Optional[Path] = None  # a plain HF directory it was read from (see to_hf)
        self._id_to_bytes = None
        self._fast = None  # (engine or None, reason): built on the first encode_batch

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> List[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def _encode_plain(self, texts: List[str]) -> List[List[int]]:
        # encode_batch_fast (tokenizers >= 0.21): the same ids without character offsets, ~15% less CPU
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        engine = self.fast_engine()[0]
        return engine.encode_batch(list(texts)) if engine is not None else self._encode_plain(list(texts))

    def fast_engine(self):
        """``(engine, reason)``: the gigatoken engine when it reproduces this tokenizer's ids on
        the built-in sample (checked once, :mod:`megatron_vpmoe.tokenizers.fast`), else ``(None,
        why not)``; batches then use the HF ``tokenizers`` encoder."""
        if self._fast is None:
            from megatron_vpmoe.tokenizers.fast import build_engine

            self._fast = build_engine(self._backend.to_str(), self._encode_plain,
                                      [f"x {s}{s} y" for s in self._special])
        return self._fast

    def decode(self, ids: List[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        if self._id_to_bytes is None:
            from megatron_vpmoe.tokenizers.bytes_map import piece_bytes_table

            self._id_to_bytes = piece_bytes_table(self._backend, self.vocab_size)
        return self._id_to_bytes[token_id]

    def to_hf(self):
        """A plain Hugging Face directory's own ``PreTrainedTokenizerFast`` (its config, chat
        template and special tokens as written there); else built from this tokenizer."""
        if self.directory is None:
            return super().to_hf()
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(self.directory))

    def hf_tokenizer(self):
        """A copy of the backend (it parses special-token strings, as :meth:`encode` does)."""
        from tokenizers import Tokenizer as RustTokenizer

        copy = RustTokenizer.from_str(self._backend.to_str())
        copy.encode_special_tokens = False
        return copy

    @classmethod
    def from_directory(cls, kind: str, directory: Path, meta: dict) -> "HFTokenizer":
        from tokenizers import Tokenizer as RustTokenizer

        backend = RustTokenizer.from_file(str(directory / HF_FILE))
        return cls(kind, directory.name, backend,
                   {k: v for k, v in meta.items() if k not in ("kind", "name", "vocab_size", "special_tokens")})
