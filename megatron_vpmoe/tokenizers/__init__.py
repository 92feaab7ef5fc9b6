"""Tokenizer toolkit: Length-MAX, BPE/Unigram, pruned teacher, o200k Harmony.

``load(dir)`` returns a :class:`Tokenizer` of any kind (``.to_hf()``: its ``transformers`` view); ``train_tokenizer`` and
``harmony_tokenizer`` build them; ``vpmoe tokenizer train|get|eval`` is the CLI.
"""

from megatron_vpmoe.tokenizers.base import KINDS, Tokenizer
from megatron_vpmoe.tokenizers.loader import load
from megatron_vpmoe.tokenizers.specials import EOD_TOKEN, HARMONY_TOKENS, PAD_TOKEN


def harmony_tokenizer(ranks_path=None):
    """The teacher's o200k Harmony tokenizer (vocab 201,088), built offline from the ranks."""
    from megatron_vpmoe.tokenizers.tiktoken_variant import harmony_tokenizer as build

    return build(ranks_path)


def train_tokenizer(kind, inputs, vocab_size, **kwargs):
    """Train a ``bpe``/``unigram``/``lengthmax``/``pruned`` tokenizer on files/globs (see
    :func:`megatron_vpmoe.tokenizers.train.train_tokenizer`)."""
    from megatron_vpmoe.tokenizers.train import train_tokenizer as train

    return train(kind, inputs, vocab_size, **kwargs)


__all__ = ["Tokenizer", "load", "harmony_tokenizer", "train_tokenizer", "KINDS",
           "EOD_TOKEN", "PAD_TOKEN", "HARMONY_TOKENS"]
