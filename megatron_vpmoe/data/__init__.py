"""Preprocessing corpora into Megatron indexed datasets."""
