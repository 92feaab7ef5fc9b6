"""Evaluation harness and the tokenizer experiment runner."""
