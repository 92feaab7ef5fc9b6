"""A SentencePiece ``.model`` behind the :class:`Tokenizer` interface, with the ids Megatron-LM's SentencePiece tokenizer types give."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from megatron_vpmoe.tokenizers.base import Tokenizer
from megatron_vpmoe.utils.errors import InputError

MODEL_FILE = "tokenizer.model"


class SentencePieceTokenizer(Tokenizer):
    """``sentencepiece``: ids are ``SentencePieceProcessor.encode(text)`` (no BOS/EOS added, the
    model's own normalization and whitespace rules, control pieces such as ``</s>`` inside text
    encoded as plain text), end of document is the model's EOS piece, and the vocabulary size
    is the model's piece count: what Megatron-LM's ``SentencePieceTokenizer``,
    ``GPTSentencePieceTokenizer`` and ``Llama2Tokenizer`` give with their default (non-legacy)
    wrapper."""

    kind = "sentencepiece"
    library = "sentencepiece"  # what encodes (preprocess reports it)

    def __init__(self, name: str, processor, metadata: Optional[dict] = None, source: str = ""):
        self._sp = processor
        where = source or name
        eos = processor.eos_id()
        if eos < 0:
            raise InputError(f"{where}: the SentencePiece model has no end-of-sentence piece (eos_id -1), which "
                             f"Megatron-LM uses as end of document")
        specials = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())
                    if processor.is_control(i) or processor.is_unknown(i)}
        self.eod_token = processor.id_to_piece(eos)
        super().__init__(name, specials, metadata, required_specials=(self.eod_token,))

    @classmethod
    def from_model_file(cls, path, name: Optional[str] = None) -> "SentencePieceTokenizer":
        import sentencepiece

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: SentencePiece model file not found")
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise InputError(f"{path}: not a SentencePiece model ({str(err).splitlines()[0]})") from None
        return cls(name or path.parent.name, processor, {"model_file": path.name}, source=str(path))

    @classmethod
    def from_directory(cls, directory: Path, meta: dict) -> "SentencePieceTokenizer":
        return cls.from_model_file(directory / MODEL_FILE, meta.get("name", directory.name))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        bos = self._sp.bos_id()
        return bos if bos >= 0 else self.eod_id

    @property
    def pad_id(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eod_id

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        # one thread: preprocessing already runs a worker process per core
        return self._sp.encode(list(texts), num_threads=1) if texts else []

    def decode(self, ids: List[int]) -> str:
        return self._sp.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        sp = self._sp
        if sp.is_control(token_id) or sp.is_unknown(token_id):
            return b""
        piece = sp.id_to_piece(token_id)
        if sp.is_byte(token_id):  # <0xNN>
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def hf_tokenizer(self):
        raise InputError(f"tokenizer {self.name!r}: a SentencePiece model has no Hugging Face tokenizer.json "
                         f"export here (it is used for preprocessing Megatron-LM data only)")

    def save(self, directory, *, overwrite: bool = True) -> Path:
        raise InputError(f"tokenizer {self.name!r}: SentencePiece models are loaded from their .model file, "
                         f"not saved as a vpmoe tokenizer directory")
