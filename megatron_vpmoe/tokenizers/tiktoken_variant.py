"""Tokenizers on tiktoken BPE ranks: the teacher's o200k Harmony tokenizer and pruned o200k
students, loaded offline, with their export to HF ``tokenizers`` byte-level BPE."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Dict, List, Optional
from unittest import mock

from megatron_vpmoe.tokenizers.base import Tokenizer
from megatron_vpmoe.tokenizers.bytes_map import bytes_to_piece
from megatron_vpmoe.utils.errors import InputError
from megatron_vpmoe.utils.paths import RANKS_FILE, o200k_ranks_file
TEACHER_MAP_FILE = "student_to_teacher.json"
HARMONY_VOCAB = 201_088


def default_ranks_path() -> Optional[Path]:
    """The local o200k ranks (:func:`megatron_vpmoe.utils.paths.o200k_ranks_file`); None: tiktoken's
    own cache or download."""
    return o200k_ranks_file()


def load_ranks(path) -> Dict[bytes, int]:
    import tiktoken.load

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: o200k ranks file not found (set TIKTOKEN_ENCODINGS_BASE)")
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{path}: not a tiktoken ranks file ({err})") from None
    if not ranks:
        raise InputError(f"{path}: empty tiktoken ranks file")
    return ranks


def o200k_harmony_spec(ranks_path=None) -> dict:
    """tiktoken's own ``o200k_harmony`` definition (pattern, special ids), with the ranks read
    from the local file instead of downloaded (without one: tiktoken's cache, or its download)."""
    import tiktoken_ext.openai_public as public

    path = ranks_path or default_ranks_path()
    if path is None:
        try:
            return public.o200k_harmony()
        except Exception as err:  # noqa: BLE001 - network and cache errors of every kind
            raise InputError(f"cannot get {RANKS_FILE} from tiktoken's cache or download ({err}); "
                             f"set TIKTOKEN_ENCODINGS_BASE to a folder holding it") from None
    ranks = load_ranks(path)
    with mock.patch.object(public, "load_tiktoken_bpe", lambda *a, **k: ranks):
        return public.o200k_harmony()


def write_ranks(path: Path, ranks: Dict[bytes, int]) -> None:
    with open(path, "w", encoding="ascii") as handle:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            handle.write(f"{base64.b64encode(token).decode()} {rank}\n")


class TiktokenTokenizer(Tokenizer):
    """``harmony`` (o200k Harmony, the teacher), ``pruned`` (a closed subset of o200k) or
    ``tiktoken`` (Megatron-LM's ``TikTokenizer``, :mod:`megatron_flags`: its own end-of-document
    token ``eod_token`` and no Harmony tokens)."""

    library = "tiktoken"  # what encodes (preprocess reports it)

    def __init__(self, kind: str, name: str, ranks: Dict[bytes, int], pat_str: str,
                 special_tokens: Dict[str, int], metadata: Optional[dict] = None,
                 n_vocab: Optional[int] = None, eod_token: Optional[str] = None):
        import tiktoken

        self.kind = kind
        if eod_token is None:
            super().__init__(name, special_tokens, metadata)
        else:
            self.eod_token = eod_token
            super().__init__(name, special_tokens, metadata, required_specials=(eod_token,))
        self.ranks = ranks
        self.pat_str = pat_str
        self._enc = tiktoken.Encoding(name=f"vpmoe_{kind}_{name}", pat_str=pat_str,
                                      mergeable_ranks=ranks, special_tokens=special_tokens,
                                      )
        self._n_vocab = n_vocab or self._enc.n_vocab
        self._hf = None
        self._hf_file = None  # a saved tokenizer.json to load instead of converting the ranks
        self.teacher_ids: Optional[List[int]] = None  # pruned: student id -> teacher id (-1: none)

    @classmethod
    def harmony(cls, ranks_path=None, name: str = "harmony") -> "TiktokenTokenizer":
        spec = o200k_harmony_spec(ranks_path)
        specials, seen = {}, set()
        for token, i in spec["special_tokens"].items():  # one name per id (200018: <|endofprompt|>)
            if i not in seen:
                specials[token] = i
                seen.add(i)
        return cls("harmony", name, spec["mergeable_ranks"], spec["pat_str"], specials,
                   n_vocab=max(specials.values()) + 1)

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def bos_id(self) -> int:
        return self._special.get("<|startoftext|>", self.eod_id)

    @property
    def pad_id(self) -> int:
        return self._special.get("<|pad|>", self.eod_id)

    def encode(self, text: str) -> List[int]:
        # special-token strings in text are their special ids (the rule in base.py's docstring)
        return self._enc.encode(text, allowed_special="all")

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return self._enc.encode_batch(list(texts), num_threads=1, allowed_special="all")

    def decode(self, ids: List[int]) -> str:
        ids = list(ids)
        if any(i in self._inverse_special for i in ids):
            return self._decode_with_specials(ids)
        return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")

    @property
    def _inverse_special(self) -> Dict[int, str]:
        inv = getattr(self, "_inv", None)
        if inv is None:
            inv = self._inv = {i: t for t, i in self._special.items()}
        return inv

    def _decode_with_specials(self, ids: List[int]) -> str:
        out, run = [], []
        for i in ids:
            if i in self._inverse_special:
                if run:
                    out.append(self._enc.decode_bytes(run).decode("utf-8", errors="replace"))
                    run = []
                out.append(self._inverse_special[i])
            else:
                run.append(i)
        if run:
            out.append(self._enc.decode_bytes(run).decode("utf-8", errors="replace"))
        return "".join(out)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._inverse_special:
            return b""
        return self._enc.decode_single_token_bytes(token_id)

    def hf_tokenizer(self):
        if self._hf is None and self._hf_file is not None and Path(self._hf_file).is_file():
            from tokenizers import Tokenizer as RustTokenizer

            self._hf = RustTokenizer.from_file(str(self._hf_file))
        if self._hf is None:
            self._hf = ranks_to_hf(self.ranks, self.pat_str, self._special, self._n_vocab)
        return self._hf

    def _save_artefacts(self, directory: Path) -> dict:
        write_ranks(directory / "ranks.tiktoken", self.ranks)
        if self.teacher_ids is not None:
            (directory / TEACHER_MAP_FILE).write_text(json.dumps(self.teacher_ids) + "\n")
        return {"pat_str": self.pat_str, "n_vocab": self._n_vocab}

    @classmethod
    def from_directory(cls, directory: Path, meta: dict) -> "TiktokenTokenizer":
        path = directory / "ranks.tiktoken"
        for key in ("pat_str", "special_tokens"):
            if key not in meta:
                raise InputError(f"{directory}/vpmoe_tokenizer.json: missing key {key!r}")
        extra = {k: v for k, v in meta.items()
                 if k not in ("kind", "name", "vocab_size", "special_tokens", "pat_str", "n_vocab", "eod_token")}
        tok = cls(meta["kind"], directory.name, load_ranks(path), meta["pat_str"],
                  {k: int(v) for k, v in meta["special_tokens"].items()}, extra,
                  n_vocab=meta.get("n_vocab"), eod_token=meta.get("eod_token"))
        tok._hf_file = directory / "tokenizer.json"
        map_file = directory / TEACHER_MAP_FILE
        if map_file.is_file():
            tok.teacher_ids = json.loads(map_file.read_text())
        return tok


def ranks_to_hf(ranks: Dict[bytes, int], pat_str: str, specials: Dict[str, int], n_vocab: int):
    """tiktoken ranks as a HF ``tokenizers`` byte-level BPE with identical ids: every
    multi-byte token's splits into two vocabulary tokens become merges, ordered by the merged
    token's rank (tiktoken merges the lowest-ranked pair first); whole pieces found in the
    vocabulary are taken directly (``ignore_merges``), as tiktoken does."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    vocab = {bytes_to_piece(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        splits = [(ranks[tok[:k]], ranks[tok[k:]], k) for k in range(1, len(tok))
                  if tok[:k] in ranks and tok[k:] in ranks]
        for ra, rb, k in sorted(splits):
            merges.append((rank, ra, rb, bytes_to_piece(tok[:k]), bytes_to_piece(tok[k:])))
    merges.sort()
    model = models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=True)
    tok = RustTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # specials in id order; holes in the id space (none for o200k Harmony) stay unused
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, _ in sorted(specials.items(), key=lambda kv: kv[1])])
    got = {t: tok.token_to_id(t) for t in specials}
    if got != dict(specials):
        bad = next(t for t in specials if got[t] != specials[t])
        raise InputError(f"special token {bad} would get id {got[bad]} in tokenizer.json, not "
                         f"{specials[bad]} (special ids must follow the ranks without gaps)")
    return tok


def harmony_tokenizer(ranks_path=None) -> TiktokenTokenizer:
    """The teacher's o200k Harmony tokenizer (vocab 201,088), built offline."""
    return TiktokenTokenizer.harmony(ranks_path)


__all__ = ["TiktokenTokenizer", "harmony_tokenizer", "ranks_to_hf", "HARMONY_VOCAB"]
