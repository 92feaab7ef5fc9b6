"""Flat-tensor collectives under the installed torch's names (``*_single`` from 2.13, ``*_tensor`` before), coalesced all-reduces, their device, and a differentiable all-to-all."""

from __future__ import annotations

from typing import Callable, List

import torch
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


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends each row's gradient back where the row came from."""

    @staticmethod
    def forward(ctx, output, input, output_split_sizes, input_split_sizes, group):  # noqa: A002 - torch's names
        ctx.splits, ctx.group, ctx.input_shape = (output_split_sizes, input_split_sizes), group, input.shape
        dist.all_to_all_single(output, input.contiguous(), output_split_sizes, input_split_sizes, group=group)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        output_split_sizes, input_split_sizes = ctx.splits
        grad_input = grad_output.new_empty(ctx.input_shape)
        dist.all_to_all_single(grad_input, grad_output.contiguous(), input_split_sizes, output_split_sizes,
                               group=ctx.group)
        return None, grad_input, None, None, None


def all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=None):  # noqa: A002
    """``dist.all_to_all_single`` into ``output`` with autograd (``torch.distributed.nn.functional``'s
    is deprecated, with a FutureWarning per call site, and the functional collectives return
    asynchronous tensors); returns ``output``."""
    return _AllToAll.apply(output, input, output_split_sizes, input_split_sizes, group)


def engine_device() -> torch.device:
    """Where collectives' buffers live: this rank's GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def coalesced(tensors: List[torch.Tensor], collective: Callable[[torch.Tensor], None]) -> None:
    """Run the in-place ``collective(flat)`` once on a flat buffer holding ``tensors`` (one
    dtype), then copy the result back into them."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    collective(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_coalesced(tensors: List[torch.Tensor], group) -> None:
    """Sum ``tensors`` over ``group`` in one all-reduce (nothing for no group or a group of one)."""
    if not tensors or group is None or dist.get_world_size(group) == 1:
        return
    coalesced(tensors, lambda flat: dist.all_reduce(flat, group=group))
