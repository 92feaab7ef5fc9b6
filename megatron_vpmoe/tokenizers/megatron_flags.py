"""Megatron-LM's ``--tokenizer-type`` flags -> a tokenizer directory :func:`megatron_vpmoe.tokenizers.load` reads.

``HuggingFaceTokenizer`` takes a local directory (a ``vpmoe tokenizer`` directory or any with a
``tokenizer.json``; the hub is not reached). The others become a directory under the user cache
named by the digest of their files and flags, written once, atomically:

- ``GPT2BPETokenizer``: ``--vocab-file`` (``vocab.json``) and ``--merge-file`` (``merges.txt``) as
  a byte-level BPE ``tokenizer.json`` (GPT-2's split regex, ``<|endoftext|>`` as end of document);
- ``SentencePieceTokenizer``, ``GPTSentencePieceTokenizer``, ``Llama2Tokenizer``: ``--tokenizer-model``
  a ``.model`` file, used by the ``sentencepiece`` library as Megatron-LM's (non-legacy) wrapper
  uses it for all three (:mod:`megatron_vpmoe.tokenizers.sentencepiece_model`);
- ``TikTokenizer``: ``--tokenizer-model`` Megatron-LM's JSON vocabulary (a list of ``{rank,
  token_bytes, token_str}``) or a ``.tiktoken`` ranks file, as Megatron-LM's ``TikTokenTokenizer``
  builds it: the special tokens (``--tokenizer-special-tokens``, default ``<unk> <s> </s> <mask>
  <pad> <cls> <sep>``, filled with ``<SPECIAL_i>`` up to ``--tiktoken-num-special-tokens``, 1000)
  take ids 0..N-1, every rank is shifted by N, the vocabulary is cut to ``--vocab-size`` (131072)
  minus N, text is split with ``--tiktoken-pattern`` v1 or v2 (default), special-token strings
  inside text become their ids, and ``</s>`` ends a document.

Anything else is refused with one line naming the flag.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from megatron_vpmoe.utils.atomic import atomic_directory
from megatron_vpmoe.utils.errors import InputError

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
SUPPORTED = ("HuggingFaceTokenizer", "GPT2BPETokenizer", "TikTokenizer") + SENTENCEPIECE_TYPES
GPT2_EOD = "<|endoftext|>"
# Megatron-LM's TikTokenTokenizer (megatron/core/tokenizers/text/libraries/tiktoken_tokenizer.py)
TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
          r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
          r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
TIKTOKEN_SPECIALS = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")
TIKTOKEN_DEFAULT_VOCAB = 2 ** 17
TIKTOKEN_DEFAULT_NUM_SPECIAL = 1000
TIKTOKEN_EOD = "</s>"


def cache_root() -> Path:
    """``$VPMOE_CACHE`` or ``$XDG_CACHE_HOME/vpmoe`` (default ``~/.cache/vpmoe``)."""
    if os.environ.get("VPMOE_CACHE"):
        return Path(os.environ["VPMOE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vpmoe"


def tokenizer_dir_from_flags(args) -> str:
    """The directory to load for Megatron-LM's tokenizer flags on ``args`` (``tokenizer_type``,
    ``tokenizer_model``, ``vocab_file``, ``merge_file``, ``tiktoken_pattern``, ``vocab_size``,
    ``tiktoken_num_special_tokens``, ``special_tokens``, ``tokenizer_sentencepiece_legacy``,
    ``tokenizer_sentencepiece_ignore_extra_whitespaces``; absent ones take Megatron-LM's
    defaults). Unusable flags: one line, exit 2."""
    flag = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    model = flag("tokenizer_model")
    kind = flag("tokenizer_type") or ("HuggingFaceTokenizer" if model else None)
    if kind == "HuggingFaceTokenizer":
        if not model:
            raise InputError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
        if not Path(model).is_dir():
            raise InputError(f"--tokenizer-model {model}: not a local directory (this tool runs "
                             f"offline: save the tokenizer with save_pretrained and give its directory)")
        return model
    if kind == "GPT2BPETokenizer":
        vocab_file, merge_file = flag("vocab_file"), flag("merge_file")
        for name, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path:
                raise InputError(f"--tokenizer-type GPT2BPETokenizer needs {name}")
            if not Path(path).is_file():
                raise InputError(f"{name} {path}: file not found")
        return str(gpt2_bpe_directory(vocab_file, merge_file))
    if kind in SENTENCEPIECE_TYPES:
        if flag("tokenizer_sentencepiece_legacy", False):
            raise InputError("--tokenizer-sentencepiece-legacy: not supported by this tool (the legacy wrapper "
                             "needs --tokenizer-special-tokens and inserts them itself)")
        if not flag("tokenizer_sentencepiece_ignore_extra_whitespaces", True):
            raise InputError("--no-tokenizer-sentencepiece-ignore-extra-whitespaces: not supported by this tool")
        if flag("special_tokens"):
            raise InputError(f"--tokenizer-special-tokens: not accepted with --tokenizer-type {kind} "
                             f"(as in Megatron-LM: give them when training the SentencePiece model)")
        _need_file(kind, model, ".model file")
        return str(sentencepiece_directory(model))
    if kind == "TikTokenizer":
        _need_file(kind, model, "vocabulary (.json or .tiktoken)")
        return str(tiktoken_directory(model, flag("tiktoken_pattern") or "v2",
                                      flag("vocab_size") or TIKTOKEN_DEFAULT_VOCAB,
                                      flag("tiktoken_num_special_tokens", TIKTOKEN_DEFAULT_NUM_SPECIAL),
                                      flag("special_tokens")))
    if kind is None:
        raise InputError("give --tokenizer-type (one of: " + ", ".join(SUPPORTED) + ") or --tokenizer-model DIR")
    raise InputError(f"--tokenizer-type {kind}: not supported by this tool (supported: {', '.join(SUPPORTED)}; "
                     f"or build a directory with 'vpmoe tokenizer train|get' and use HuggingFaceTokenizer)")


def _need_file(kind: str, path: Optional[str], what: str) -> None:
    if not path:
        raise InputError(f"--tokenizer-type {kind} needs --tokenizer-model (a {what})")
    if not Path(path).is_file():
        raise InputError(f"--tokenizer-model {path}: file not found (--tokenizer-type {kind} takes a {what})")


def _digest(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def sentencepiece_directory(model_file: str) -> Path:
    """A copy of the ``.model`` file as a ``sentencepiece`` tokenizer directory in the cache
    (checked to load, so a bad file fails here in one line)."""
    from megatron_vpmoe.tokenizers.base import METADATA_FILE
    from megatron_vpmoe.tokenizers.sentencepiece_model import MODEL_FILE, SentencePieceTokenizer

    data = Path(model_file).read_bytes()
    directory = cache_root() / "tokenizers" / f"sentencepiece-{_digest(data)}"
    if (directory / METADATA_FILE).is_file():
        return directory
    SentencePieceTokenizer.from_model_file(model_file)  # a one-line error for a file that is no model
    with atomic_directory(directory, overwrite=True) as tmp:
        (tmp / MODEL_FILE).write_bytes(data)
        (tmp / METADATA_FILE).write_text(json.dumps({"kind": "sentencepiece", "name": Path(model_file).stem,
                                                     "source": os.path.abspath(model_file)}, indent=2) + "\n")
    return directory


def _megatron_vocab(path: str, limit: int) -> Dict[bytes, int]:
    """Megatron-LM's JSON vocabulary (its checks, as one-line errors), the first ``limit`` entries."""
    try:
        vocab = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a JSON vocabulary ({err})") from None
    if not isinstance(vocab, list):
        raise InputError(f"{path}: expected a JSON list of {{rank, token_bytes, token_str}} (Megatron-LM's "
                         f"TikTokenizer vocabulary)")
    ranks: Dict[bytes, int] = {}
    for i, entry in enumerate(vocab[:limit]):
        if not isinstance(entry, dict) or set(entry) != {"rank", "token_bytes", "token_str"}:
            raise InputError(f"{path}: entry {i} is not {{rank, token_bytes, token_str}}")
        if entry["rank"] != i:
            raise InputError(f"{path}: entry {i} has rank {entry['rank']} (ranks must be 0, 1, 2, ...)")
        try:
            token = base64.b64decode(entry["token_bytes"], validate=True)
        except (ValueError, TypeError):
            raise InputError(f"{path}: entry {i}: token_bytes is not base64") from None
        if i < 256 and token != bytes([i]):
            raise InputError(f"{path}: entry {i} must be the single byte {i} (the first 256 ranks are the bytes)")
        ranks[token] = i
    return ranks


def _tiktoken_ranks(path: str, limit: int) -> Dict[bytes, int]:
    """A ``.tiktoken`` file's ranks below ``limit`` (they must run 0, 1, 2, ... as Megatron-LM's
    JSON vocabulary does)."""
    from megatron_vpmoe.tokenizers.tiktoken_variant import load_ranks

    ranks = {tok: r for tok, r in load_ranks(path).items() if r < limit}
    if set(ranks.values()) != set(range(len(ranks))):
        raise InputError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def tiktoken_directory(vocab_file: str, pattern: str, vocab_size: int, num_special: int,
                       special_tokens: Optional[List[str]]) -> Path:
    """Megatron-LM's ``TikTokenizer`` as a ``tiktoken`` tokenizer directory in the cache: shifted
    ranks (``ranks.tiktoken``) and the specials, pattern and vocabulary size in its metadata."""
    from megatron_vpmoe.tokenizers.base import METADATA_FILE
    from megatron_vpmoe.tokenizers.tiktoken_variant import write_ranks

    if pattern not in TIKTOKEN_PATTERNS:
        raise InputError(f"--tiktoken-pattern {pattern}: expected v1 or v2")
    specials = list(special_tokens) if special_tokens else list(TIKTOKEN_SPECIALS)
    if len(set(specials)) != len(specials):
        raise InputError(f"--tokenizer-special-tokens: a token is given twice ({' '.join(specials)})")
    missing = [t for t in TIKTOKEN_SPECIALS if t not in specials]
    if missing:
        raise InputError(f"--tokenizer-special-tokens: must include {' '.join(TIKTOKEN_SPECIALS)} (missing "
                         f"{' '.join(missing)})")
    if not len(specials) <= num_special < vocab_size:
        raise InputError(f"--tiktoken-num-special-tokens {num_special}: must be at least the {len(specials)} special "
                         f"tokens and below --vocab-size {vocab_size}")
    data = Path(vocab_file).read_bytes()
    key = _digest(data, pattern, vocab_size, num_special, specials)
    directory = cache_root() / "tokenizers" / f"tiktoken-{key}"
    if (directory / METADATA_FILE).is_file():
        return directory
    inner = vocab_size - num_special
    json_format = vocab_file.endswith(".json")
    ranks = _megatron_vocab(vocab_file, inner) if json_format else _tiktoken_ranks(vocab_file, inner)
    if len(ranks) != inner:
        raise InputError(f"--vocab-size {vocab_size}: {vocab_file} has {len(ranks)} tokens, fewer than --vocab-size "
                         f"minus --tiktoken-num-special-tokens ({inner}); give --vocab-size {len(ranks) + num_special}")
    names = specials + [f"<SPECIAL_{i}>" for i in range(len(specials), num_special)]
    meta = {"kind": "tiktoken", "name": Path(vocab_file).stem, "source": os.path.abspath(vocab_file),
            "pat_str": TIKTOKEN_PATTERNS[pattern], "special_tokens": {t: i for i, t in enumerate(names)},
            "n_vocab": vocab_size, "eod_token": TIKTOKEN_EOD}
    with atomic_directory(directory, overwrite=True) as tmp:
        write_ranks(tmp / "ranks.tiktoken", {tok: r + num_special for tok, r in ranks.items()})
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return directory


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
