"""Tokenizer toolkit: Length-MAX, BPE/Unigram, pruned teacher, o200k Harmony.

``load_tokenizer(dir)`` returns a :class:`Tokenizer` of any kind; ``train_tokenizer`` and
``harmony_tokenizer`` build them; ``vpmoe tokenizer train|get|eval`` is the CLI.
"""

from megatron_vpmoe.tokenizers.base import (EOD_TOKEN, HARMONY_TOKENS, KINDS, PAD_TOKEN, Tokenizer,
                                            load_tokenizer)


def harmony_tokenizer(ranks_path=None):
    """The teacher's o200k Harmony tokenizer (vocab 201,088), built offline from the ranks."""
    from megatron_vpmoe.tokenizers.tiktoken_variant import harmony_tokenizer as build

    return build(ranks_path)


def train_tokenizer(kind, inputs, vocab_size, **kwargs):
    """Train a ``bpe``/``unigram``/``lengthmax``/``pruned`` tokenizer on files/globs (see
    :func:`megatron_vpmoe.tokenizers.train.train_tokenizer`)."""
    from megatron_vpmoe.tokenizers.train import train_tokenizer as train

    return train(kind, inputs, vocab_size, **kwargs)


__all__ = ["Tokenizer", "load_tokenizer", "harmony_tokenizer", "train_tokenizer", "KINDS",
           "EOD_TOKEN", "PAD_TOKEN", "HARMONY_TOKENS"]
