"""The flat-tensor collectives under the name the installed torch has (``*_single`` from 2.13, ``*_tensor`` before)."""

from __future__ import annotations

import torch.distributed as dist

# setup.py allows torch >= 2.6 and GPU images bring their own (the H200 one had 2.11, which has only
# the older names). Looked up at each call, so a wrapper on torch.distributed (benchmarks/scale.py
# counts bytes that way) sees the call.


def all_gather_single(output, input, group=None, async_op=False):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, input, group=group, async_op=async_op)


def reduce_scatter_single(output, input, group=None, async_op=False):
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(output, input, group=group, async_op=async_op)
