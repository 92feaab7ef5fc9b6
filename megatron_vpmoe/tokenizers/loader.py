"""The one tokenizer loader: a directory (vpmoe of any kind, tiktoken/Harmony, or plain Hugging Face) -> a :class:`Tokenizer`."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_vpmoe.tokenizers.base import HF_FILE, KINDS, METADATA_FILE, HFTokenizer, Tokenizer
from megatron_vpmoe.tokenizers.specials import EOD_TOKEN
from megatron_vpmoe.utils.errors import ConfigError, InputError


def load_for_model(directory, vocab_size: int) -> Tokenizer:
    """``load(directory)`` for a model with ``vocab_size`` embedding rows: a tokenizer with more
    tokens is refused (``data.tokenizer``'s ids would index past the embedding at step 1)."""
    tokenizer = load(directory)
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"data.tokenizer {directory} has {tokenizer.vocab_size} tokens, more than "
                          f"model.vocab_size {vocab_size}", key="model.vocab_size")
    return tokenizer


def load(directory) -> Tokenizer:
    """Load a tokenizer directory: one written by ``Tokenizer.save`` (``vpmoe tokenizer
    train|get``: ``vpmoe_tokenizer.json`` names the kind; ``harmony``/``pruned``/``tiktoken`` load
    on tiktoken ranks, ``sentencepiece`` on a ``.model`` file; the last two are Megatron-LM's
    tokenizer types, :mod:`megatron_vpmoe.tokenizers.megatron_flags`) or a plain Hugging Face
    ``tokenizer.json`` directory (``save_pretrained`` output). ``.to_hf()`` gives the ``transformers`` tokenizer with the same ids."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: tokenizer directory not found")
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file() and (directory / HF_FILE).is_file():
        return _load_plain_hf(directory)
    if not meta_path.is_file():
        raise InputError(f"{directory}: not a vpmoe tokenizer directory (no {METADATA_FILE}; "
                         f"create one with 'vpmoe tokenizer train' or 'vpmoe tokenizer get harmony')")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
    except (ValueError, KeyError) as err:
        raise InputError(f"{meta_path}: invalid tokenizer metadata ({err})") from None
    if kind not in KINDS:
        raise InputError(f"{meta_path}: unknown tokenizer kind {kind!r} (expected one of {', '.join(KINDS)})")
    meta.setdefault("name", directory.name)
    if kind in ("harmony", "pruned", "tiktoken"):
        from megatron_vpmoe.tokenizers.tiktoken_variant import TiktokenTokenizer

        return TiktokenTokenizer.from_directory(directory, meta)
    if kind == "sentencepiece":
        from megatron_vpmoe.tokenizers.sentencepiece_model import SentencePieceTokenizer

        return SentencePieceTokenizer.from_directory(directory, meta)
    if not (directory / HF_FILE).is_file():
        raise InputError(f"{directory}: missing {HF_FILE}")
    try:
        return HFTokenizer.from_directory(kind, directory, meta)
    except Exception as err:  # noqa: BLE001 - a corrupt tokenizer.json is an input problem
        raise InputError(f"{directory / HF_FILE}: cannot load ({err})") from None


def _load_plain_hf(directory: Path) -> HFTokenizer:
    """A directory with only a HF ``tokenizer.json`` (e.g. ``save_pretrained`` output): loaded
    as ``bpe``/``unigram`` by its model type; EOD is ``<|endoftext|>`` or the config's
    ``eos_token``; Harmony tokens are optional (``token_to_id`` raises KeyError if absent). Its
    ``to_hf()`` reads the directory itself, so its own ``tokenizer_config.json`` (chat
    template, BOS/PAD) holds."""
    from tokenizers import Tokenizer as RustTokenizer

    try:
        backend = RustTokenizer.from_file(str(directory / HF_FILE))
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{directory / HF_FILE}: cannot load ({err})") from None
    model = type(backend.model).__name__.lower()
    kind = "unigram" if model == "unigram" else "bpe"
    eod = EOD_TOKEN
    config = directory / "tokenizer_config.json"
    specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    if eod not in specials and config.is_file():
        try:
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        except ValueError:
            eos = None
        eod = eos.get("content") if isinstance(eos, dict) else (eos or eod)
    tok = HFTokenizer(kind, directory.name, backend, {"foreign": True, "model": model}, eod_token=eod)
    tok.directory = directory
    return tok
