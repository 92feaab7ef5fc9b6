"""Parallelism applied to the plain model from outside: TP, EP, PP, DP."""
