"""Parallelism applied to the plain model from outside: TP, EP, PP, DP."""

from megatron_vpmoe.parallel.model import ParallelModel, build_parallel_model  # noqa: F401
from megatron_vpmoe.parallel.state import ParallelContext, init_parallel  # noqa: F401
