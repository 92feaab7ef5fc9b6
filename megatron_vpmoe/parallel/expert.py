"""Expert parallelism: an all-to-all dispatcher over the expert-parallel group.

Each EP rank holds ``num_experts / ep`` consecutive experts. Tokens are permuted by global
expert (``kernels.ops.permute``), exchanged with a differentiable uneven
``all_to_all_single`` (``parallel/collectives.py``), re-sorted by local expert,
computed with one grouped GEMM, and sent back the same way before ``kernels.ops.unpermute``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_vpmoe.kernels import ops
from megatron_vpmoe.parallel.collectives import all_to_all_single


class AllToAllDispatcher:
    """Routes a MoE layer's tokens to the EP rank holding their expert and back (one host read of
    the split sizes per call: ``all_to_all_single`` takes them as Python lists)."""

    def __init__(self, ep_size: int, ep_group):
        self.ep_size, self.group = ep_size, ep_group

    def __call__(self, tokens, weights, indices, experts, num_experts: int):
        ep, local = self.ep_size, num_experts // self.ep_size
        permuted, sort_order, tokens_per_expert = ops.permute(tokens, indices, num_experts)
        # how many rows go to each (rank, local expert), and how many come back from each rank
        recv_counts = torch.empty_like(tokens_per_expert)
        dist.all_to_all_single(recv_counts, tokens_per_expert.contiguous(), group=self.group)
        recv_by_rank = recv_counts.view(ep, local)  # [source rank, local expert]
        # the one host read of the layer call: both split lists in one transfer
        send_splits, recv_splits = torch.stack(
            [tokens_per_expert.view(ep, local).sum(1), recv_by_rank.sum(1)]).tolist()
        received_rows = sum(recv_splits)
        received = all_to_all_single(
            permuted.new_empty(received_rows, permuted.shape[1]), permuted,
            recv_splits, send_splits, group=self.group)
        # rows arrive grouped by source rank then local expert: regroup by local expert
        expert_of_row = torch.arange(local, device=tokens.device).repeat(ep).repeat_interleave(
            recv_by_rank.reshape(-1), output_size=received_rows)
        order = torch.argsort(expert_of_row, stable=True)
        out_sorted = experts(received.index_select(0, order), recv_by_rank.sum(0))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = out_sorted.index_select(0, inverse)
        returned = all_to_all_single(
            permuted.new_empty(permuted.shape[0], out.shape[1]), out,
            send_splits, recv_splits, group=self.group)
        return ops.unpermute(returned, sort_order, weights, tokens.shape[0])
