"""Tokenizer toolkit: Length-MAX, BPE/Unigram, pruned teacher, o200k Harmony."""
