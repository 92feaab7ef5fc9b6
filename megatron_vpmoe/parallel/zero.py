"""The distributed optimizer (``parallel.distributed_optimizer``): ZeRO-1 over data-parallel ranks.

Every parameter's optimizer state (AdamW's ``exp_avg``/``exp_avg_sq``/``step``) lives on one
rank of the group that reduces its gradient — the data-parallel group for dense parameters,
the expert-data-parallel group for routed experts — chosen greedily by size so each rank holds
about ``1 / dp`` of the state. After the gradient all-reduce every rank has the full gradient;
only the owner steps a parameter (the others hide the gradient from the wrapped optimizer, so
it neither creates state nor updates the weight), then each owner broadcasts its updated
parameters to the group in one coalesced buffer. The update is the same arithmetic as the
unsharded optimizer, so runs agree with it bit for bit.

Checkpoints keep the layout-independent format without gathering anything: each owner writes
the state it owns at the parameter's single-process key, and a load creates and reads only the
state of the parameters this rank owns (:meth:`DistributedOptimizer.owns`), whatever layout the
checkpoint was saved with (``megatron_vpmoe.training.checkpoint``).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron_vpmoe.parallel.model import coalesced


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def assign_owners(named_params: List[Tuple[str, torch.Tensor]], size: int) -> Dict[str, int]:
    """Owner index (0..size-1) per parameter name: largest first onto the least-loaded rank
    (ties by name), so the result depends only on names and shapes."""
    loads = [0] * size
    owners: Dict[str, int] = {}
    for name, param in sorted(named_params, key=lambda item: (-item[1].numel(), item[0])):
        rank = min(range(size), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += param.numel()
    return owners


class DistributedOptimizer:
    """Wraps a torch optimizer built over all of this rank's parameters; see the module doc."""

    def __init__(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module, dp_group, expert_dp_group):
        self.optimizer = optimizer
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        dense = [(n, p) for n, p in named if not getattr(p, "expert_parallel", False)]
        experts = [(n, p) for n, p in named if getattr(p, "expert_parallel", False)]
        # per reduction group: [(group, [params of owner 0], [params of owner 1], ...)]
        self._groups: List[Tuple[object, List[List[torch.Tensor]]]] = []
        self._owned: set = set()
        for params, group in ((dense, dp_group), (experts, expert_dp_group)):
            if not params:
                continue
            size = _group_size(group)
            owners = assign_owners(params, size)
            me = 0 if size == 1 else dist.get_rank(group)
            by_owner: List[List[torch.Tensor]] = [[] for _ in range(size)]
            for name, p in params:  # module order: the same on every rank of the group
                by_owner[owners[name]].append(p)
                if owners[name] == me:
                    self._owned.add(p)
            self._groups.append((group, by_owner))

    # -- the optimizer interface the trainer uses ----------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        hidden = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p not in self._owned and p.grad is not None:
                    hidden[p], p.grad = p.grad, None
        try:
            self.optimizer.step()
        finally:
            for p, grad in hidden.items():
                p.grad = grad
        self._broadcast_parameters()

    def owns(self, param: torch.Tensor) -> bool:
        """Whether this rank holds (steps, saves and loads) ``param``'s optimizer state."""
        return param in self._owned

    def owned_state_numel(self) -> int:
        """Elements of optimizer-state tensors held by this rank (what ZeRO shards)."""
        return sum(t.numel() for s in self.optimizer.state.values() for key, t in s.items()
                   if isinstance(t, torch.Tensor) and key != "step")

    # -- communication -------------------------------------------------------------------------
    def _broadcast_parameters(self) -> None:
        for group, by_owner in self._groups:
            if _group_size(group) == 1:
                continue
            for owner, params in enumerate(by_owner):
                for bucket in _by_dtype(params):
                    coalesced(bucket, lambda flat: dist.broadcast(flat, group_src=owner, group=group))


def _by_dtype(params: List[torch.Tensor]) -> List[List[torch.Tensor]]:
    buckets: Dict[torch.dtype, List[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault(p.dtype, []).append(p)
    return list(buckets.values())
