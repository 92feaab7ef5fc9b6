"""Megatron-LM's ``--tokenizer-type`` flags -> a tokenizer directory :func:`megatron_vpmoe.tokenizers.load` reads.

``HuggingFaceTokenizer`` takes a local directory (a ``vpmoe tokenizer`` directory or any with a
``tokenizer.json``; the hub is not reached). ``GPT2BPETokenizer`` takes ``--vocab-file``
(``vocab.json``) and ``--merge-file`` (``merges.txt``): they become a byte-level BPE
``tokenizer.json`` (GPT-2's split regex, ``<|endoftext|>`` as end of document) in a directory
under the user cache named by the two files' digest, written once, atomically. Other types
are refused with one line naming what is supported.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from megatron_vpmoe.utils.atomic import atomic_directory
from megatron_vpmoe.utils.errors import InputError

SUPPORTED = ("HuggingFaceTokenizer", "GPT2BPETokenizer")
GPT2_EOD = "<|endoftext|>"


def cache_root() -> Path:
    """``$VPMOE_CACHE`` or ``$XDG_CACHE_HOME/vpmoe`` (default ``~/.cache/vpmoe``)."""
    if os.environ.get("VPMOE_CACHE"):
        return Path(os.environ["VPMOE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vpmoe"


def tokenizer_dir_from_flags(tokenizer_type: Optional[str], tokenizer_model: Optional[str],
                             vocab_file: Optional[str], merge_file: Optional[str]) -> str:
    """The directory to load for Megatron-LM's tokenizer flags (one line, exit 2, when unusable)."""
    kind = tokenizer_type or ("HuggingFaceTokenizer" if tokenizer_model else None)
    if kind == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise InputError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
        if not Path(tokenizer_model).is_dir():
            raise InputError(f"--tokenizer-model {tokenizer_model}: not a local directory (this tool runs "
                             f"offline: save the tokenizer with save_pretrained and give its directory)")
        return tokenizer_model
    if kind == "GPT2BPETokenizer":
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path:
                raise InputError(f"--tokenizer-type GPT2BPETokenizer needs {flag}")
            if not Path(path).is_file():
                raise InputError(f"{flag} {path}: file not found")
        return str(gpt2_bpe_directory(vocab_file, merge_file))
    if kind is None:
        raise InputError("give --tokenizer-type (HuggingFaceTokenizer or GPT2BPETokenizer) or --tokenizer-model DIR")
    raise InputError(f"--tokenizer-type {kind}: not supported by this tool (supported: {', '.join(SUPPORTED)}; "
                     f"or build a directory with 'vpmoe tokenizer train|get' and use HuggingFaceTokenizer)")


def gpt2_bpe_directory(vocab_file: str, merge_file: str) -> Path:
    """GPT-2 ``vocab.json`` + ``merges.txt`` as a plain HF tokenizer directory in the cache."""
    digest = hashlib.sha256()
    for path in (vocab_file, merge_file):
        digest.update(Path(path).read_bytes())
    directory = cache_root() / "tokenizers" / f"gpt2bpe-{digest.hexdigest()[:16]}"
    if (directory / "tokenizer.json").is_file():
        return directory
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    try:
        model = models.BPE.from_file(vocab_file, merge_file)
    except Exception as err:  # noqa: BLE001 - the tokenizers library's own error types
        raise InputError(f"{vocab_file} / {merge_file}: not a GPT-2 vocab.json/merges.txt pair ({err})") from None
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(GPT2_EOD) is None:
        raise InputError(f"{vocab_file}: no {GPT2_EOD} token (GPT2BPETokenizer's end of document)")
    tok.add_special_tokens([AddedToken(GPT2_EOD, special=True, normalized=False)])
    with atomic_directory(directory, overwrite=True) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({"eos_token": GPT2_EOD}) + "\n")
    return directory
