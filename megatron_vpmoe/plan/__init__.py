"""Capacity planning: per-rank memory, FLOPs and step time of a config on N x G GPUs, before submitting."""
