"""Train student tokenizers: ``bpe`` (HF ``tokenizers`` byte-level BPE, optionally superword),
``unigram`` (sentencepiece, exported to a ``tokenizers`` Unigram), and the dispatch to
``lengthmax`` and ``pruned``. Each returns an in-memory :class:`Tokenizer`; saving is atomic."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_vpmoe.tokenizers.base import MIN_STUDENT_VOCAB, HFTokenizer, Tokenizer, check_vocab_size
from megatron_vpmoe.tokenizers.corpus import chunk_documents, load_documents
from megatron_vpmoe.tokenizers.specials import STUDENT_SPECIALS
from megatron_vpmoe.utils.errors import InputError

TRAINABLE = ("bpe", "unigram", "lengthmax", "pruned")
MAX_STUDENT_VOCAB = 1 << 21  # Length-MAX keys token pairs as a * 2**21 + b; far above any student vocabulary


def _added_specials():
    from tokenizers import AddedToken

    return [AddedToken(t, special=True, normalized=False) for t in STUDENT_SPECIALS]


def train_bpe(docs: Sequence[str], vocab_size: int, *, superword: bool = False,
              show_progress: bool = False, name: str = "bpe"):
    """Byte-level BPE with the GPT-2 pre-tokenization regex (``superword=False``) or without it
    (``superword=True``: tokens may cross spaces; documents are chunked at line breaks)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    check_vocab_size("bpe", vocab_size)
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not superword)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_added_specials(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    pieces = chunk_documents(docs, 256 if superword else 65536)
    tok.train_from_iterator(pieces, trainer)
    return HFTokenizer("bpe", name, tok, {"superword": superword})


def train_unigram(docs: Sequence[str], vocab_size: int, *, show_progress: bool = False,
                  name: str = "unigram", max_sentences: int = 2_000_000):
    """SentencePiece Unigram with byte fallback and identity normalization (lossless), exported
    to a ``tokenizers`` Unigram model with the same pieces and scores."""
    import sentencepiece as spm
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    check_vocab_size("unigram", vocab_size, MIN_STUDENT_VOCAB + 1)
    sentences = (line for chunk in chunk_documents(docs, 2048) for line in chunk.splitlines() if line.strip())
    import io

    model = io.BytesIO()
    sp_vocab = vocab_size - len(STUDENT_SPECIALS)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_writer=model, model_type="unigram",
            vocab_size=sp_vocab, byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_digits=False, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            max_sentence_length=16384, minloglevel=0 if show_progress else 2, num_threads=2,
            hard_vocab_limit=False)
    except RuntimeError as err:
        raise InputError(f"sentencepiece could not train a {vocab_size}-token unigram: {err}") from None
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # pieces carry real spaces (sentencepiece's U+2581 mapped back), so a literal U+2581 in
    # text is an ordinary character (byte fallback) and decoding is exact for any input
    vocab = [(proc.id_to_piece(i).replace("\u2581", " "), proc.get_score(i))
             for i in range(proc.get_piece_size())]
    backend = RustTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(" +[^ ]*|[^ ]+"), behavior="isolated")
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(_added_specials())
    return HFTokenizer("unigram", name, backend, {"trainer": "sentencepiece"})


def train_tokenizer(kind: str, inputs: Sequence[str], vocab_size: int, *,
                    output: Optional[str] = None, max_bytes: Optional[int] = None,
                    show_progress: bool = False, name: Optional[str] = None, **options) -> Tokenizer:
    """Train ``kind`` on ``inputs`` (files, globs, ``FILE.jsonl:FIELD``); save to ``output``
    atomically when given (an interrupted run leaves no directory)."""
    if kind not in TRAINABLE:
        raise InputError(f"unknown tokenizer kind {kind!r} (trainable: {', '.join(TRAINABLE)})")
    if vocab_size > MAX_STUDENT_VOCAB:
        raise InputError(f"--vocab-size {vocab_size} is larger than {MAX_STUDENT_VOCAB:,}")
    if max_bytes is not None and max_bytes < 1:
        raise InputError(f"--max-bytes must be >= 1, got {max_bytes}")
    name = name or (Path(output).name if output else kind)
    docs = load_documents(inputs, max_bytes)
    start = time.perf_counter()
    if kind == "bpe":
        tok = train_bpe(docs, vocab_size, show_progress=show_progress, name=name, **options)
    elif kind == "unigram":
        tok = train_unigram(docs, vocab_size, show_progress=show_progress, name=name, **options)
    elif kind == "lengthmax":
        from megatron_vpmoe.tokenizers.lengthmax import train_lengthmax

        tok = train_lengthmax(docs, vocab_size, show_progress=show_progress, name=name, **options)
    else:
        from megatron_vpmoe.tokenizers.pruned import prune_teacher

        tok = prune_teacher(docs, vocab_size, show_progress=show_progress, name=name, **options)
    tok.metadata["train_seconds"] = round(time.perf_counter() - start, 3)
    tok.metadata["train_inputs"] = [str(i) for i in inputs]
    tok.metadata["train_files"], tok.metadata["train_bytes"] = docs.files, docs.nbytes
    if output:
        tok.save(output)
    return tok
