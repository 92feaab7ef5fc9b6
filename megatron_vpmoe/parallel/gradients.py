"""This rank's gradients after backward: the bucketed sync's lifecycle, the layout's reductions, the global norm.

Which group a gradient sums over, whether it is a TP-partial sum and where its squared norm is
added all come from the parameter's :class:`~megatron_vpmoe.parallel.placement.Placement`.
Dense gradients sum over the data-parallel group and routed experts' over the expert-data-parallel
group, in buckets during backward (``grad_sync.py``) or after it; under :meth:`ShardGradients.shard_to`
(ZeRO-2) they are reduce-scattered to the distributed optimizer's split instead.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_vpmoe.parallel.collectives import all_reduce_coalesced, engine_device
from megatron_vpmoe.parallel.placement import Kind, Placements
from megatron_vpmoe.parallel.state import ParallelContext


class ShardGradients:
    """The gradients of one shard (``module``) over layout ``ctx``: reduce, hold, measure."""

    def __init__(self, module: torch.nn.Module, ctx: ParallelContext, placements: Placements):
        self.module, self.ctx, self.placements = module, ctx, placements
        self.sync = None  # bucketed DP gradient reduction overlapped with backward (built at the first step)
        self.shard_of = None  # the distributed optimizer's split: gradients are reduce-scattered to it
        # given to the bucketed reduction when it is built: told each launch/finish (GradSync.observer)
        self.observer: Optional[Callable[[str, int], None]] = None

    def shard_to(self, shard_of) -> None:
        """Reduce-scatter data-parallel gradients to the distributed optimizer's split
        (``DistributedOptimizer.gradient_shard``) instead of all-reducing them: after a step's
        backward each rank holds only the gradient parts it steps (:meth:`tensors`)."""
        if self.sync:
            self.sync.remove()
        self.shard_of, self.sync = shard_of, None

    def held(self) -> List[Tuple[torch.Tensor, torch.Tensor, bool]]:
        """``(tensor, its parameter, split over the DP group)`` for every tensor whose ``.grad``
        this rank holds after a step's reduction: the parameters, except that under
        :meth:`shard_to` the reduce-scattered ones give way to this rank's parts."""
        sync = self.sync if self.shard_of is not None else None
        held = [(t, p, True) for t, p in sync.held()] if sync else []
        in_sync = {id(p) for p in sync.params} if sync else set()
        return [(p, p, False) for p in self.module.parameters() if id(p) not in in_sync] + held

    def tensors(self) -> List[torch.Tensor]:
        """The tensors whose ``.grad`` this rank holds (what gradient clipping scales)."""
        return [t for t, _, _ in self.held() if t.grad is not None]

    def norm(self) -> torch.Tensor:
        """L2 norm of the full model's gradient (call after the reduction): parts reduce-scattered
        over a data-parallel group are summed over that group, TP-sharded and expert-sharded
        gradients over their groups, pipeline stages added, replicated gradients counted once.
        The same value on every rank."""
        from torch.nn.utils import get_total_norm

        # (category, split over a DP group) -> gradients; category: where the squared norm sums
        grads: Dict[tuple, List[torch.Tensor]] = {}
        for t, p, split in self.held():
            if t.grad is None:
                continue
            where = self.placements[p]
            kind = "experts" if where.is_expert else "tp" if where.is_tensor_split else "replicated"
            grads.setdefault((kind, split), []).append(t.grad)

        def squared(kind, split):
            got = grads.get((kind, split))
            if not got:
                return torch.zeros(1, dtype=torch.float64, device=engine_device())
            return get_total_norm(got, 2.0, error_if_nonfinite=False).double().to(engine_device()).view(1) ** 2

        # parts split over the DP group (dense) / the expert-DP group (experts) sum over it first
        dense = torch.cat([squared("tp", True), squared("replicated", True)])
        experts = squared("experts", True)
        if self.shard_of is not None and self.sync:  # the same decision on every rank of a group
            if self.ctx.dp > 1:
                dist.all_reduce(dense, group=self.ctx.dp_group)
            if self.ctx.expert_dp_group is not None and dist.get_world_size(self.ctx.expert_dp_group) > 1:
                dist.all_reduce(experts, group=self.ctx.expert_dp_group)
        tp_sq = squared("tp", False) + dense[0:1]
        ep_sq = squared("experts", False) + experts
        replicated = squared("replicated", False) + dense[1:2]
        if self.ctx.tp > 1:
            dist.all_reduce(tp_sq, group=self.ctx.tp_group)
        if self.ctx.ep > 1:
            dist.all_reduce(ep_sq, group=self.ctx.ep_group)
        total = tp_sq + ep_sq + replicated
        if self.ctx.pp > 1:
            dist.all_reduce(total, group=self.ctx.pp_group)
        return total.sqrt()[0]  # stays on the device: the caller decides when to read it

    def overlapped_sync(self):
        """The bucketed, backward-overlapped DP reduction (``parallel.overlap_grad_reduce``), or None."""
        overlap = self.ctx.config.overlap_grad_reduce
        if not overlap and self.shard_of is None:
            return None
        if self.sync is None:
            from megatron_vpmoe.parallel.grad_sync import build_grad_sync

            self.sync = build_grad_sync(self.module, lambda p: self.placements[p].grad_group,
                                              self.ctx.config.bucket_mb, self.shard_of, overlap) or False
            if self.sync:
                self.sync.observer = self.observer
        return self.sync or None

    def reduce(self, data_parallel: bool = True) -> None:
        """Sum TP-partial gradients over the TP group and (``data_parallel``; off when the
        overlapped buckets already did it) every gradient over its data-parallel group. Under
        :meth:`shard_to` the TP sum covers this rank's reduce-scattered parts (every TP
        peer holds the same parts: the split depends on names and shapes only)."""
        dense, experts, partial = [], [], []
        for t, p, split in self.held():
            if t.grad is None:
                if split:
                    continue
                t.grad = torch.zeros_like(t)
            where = self.placements[p]
            if not split:
                (experts if where.is_expert else dense).append(t.grad)
            if where.kind is Kind.PARTIAL_GRAD:
                partial.append(t.grad)
        if self.ctx.tp > 1:
            all_reduce_coalesced(partial, self.ctx.tp_group)
        if not data_parallel:
            return
        if self.ctx.dp > 1:
            all_reduce_coalesced(dense, self.ctx.dp_group)
        all_reduce_coalesced(experts, self.ctx.expert_dp_group)
