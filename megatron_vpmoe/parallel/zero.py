"""The distributed optimizer (``parallel.distributed_optimizer``): ZeRO-1 over data-parallel ranks.

Every parameter's optimizer state (AdamW's ``exp_avg``/``exp_avg_sq``/``step``) lives on one
rank of the group that reduces its gradient — the data-parallel group for dense parameters,
the expert-data-parallel group for routed experts — chosen greedily by size so each rank holds
about ``1 / dp`` of the state. After the gradient all-reduce every rank has the full gradient;
only the owner steps a parameter (the others hide the gradient from the wrapped optimizer, so
it neither creates state nor updates the weight), then each owner broadcasts its updated
parameters to the group in one coalesced buffer. The update is the same arithmetic as the
unsharded optimizer, so runs agree with it bit for bit.

Checkpoints keep the layout-independent format: :meth:`DistributedOptimizer.full_state`
gathers the state from the owners for the duration of a save (each rank briefly holds the full
state of its shard, as without ZeRO) and :meth:`release_state` drops what a rank does not own
after a save or a load.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_vpmoe.parallel.model import coalesced, engine_device


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

    @contextlib.contextmanager
    def full_state(self) -> Iterator[None]:
        """Inside: every parameter's state on every rank (gathered from its owner)."""
        self.gather_state()
        try:
            yield
        finally:
            self.release_state()

    @torch.no_grad()
    def gather_state(self) -> None:
        state = self.optimizer.state
        for group, by_owner in self._groups:
            if _group_size(group) == 1:
                continue
            me = dist.get_rank(group)
            for owner, params in enumerate(by_owner):
                # which of the owner's parameters have state yet, and its keys
                header: List[Optional[object]] = [None]
                if me == owner:
                    present = [i for i, p in enumerate(params) if state.get(p)]
                    first = state[params[present[0]]] if present else {}
                    keys = sorted(first)
                    header = [(present, keys, {k: (first[k].dtype, first[k].dim() == 0, first[k].device.type)
                                               for k in keys})]
                dist.broadcast_object_list(header, group_src=owner, group=group)
                present, keys, kinds = header[0]
                if not present:
                    continue
                for key in keys:
                    dtype, scalar, kept_on = kinds[key]
                    if me == owner:
                        parts = [state[params[i]][key].reshape(-1) for i in present]
                    else:
                        parts = [torch.zeros(1 if scalar else params[i].numel(), dtype=dtype)
                                 for i in present]
                    device = params[present[0]].device if not scalar else engine_device()
                    flat = torch.cat([t.to(device) for t in parts])
                    dist.broadcast(flat, group_src=owner, group=group)
                    if me == owner:
                        continue
                    offset = 0
                    for i in present:
                        p = params[i]
                        n = 1 if scalar else p.numel()
                        value = flat[offset:offset + n]
                        offset += n
                        entry = state.setdefault(p, {})
                        home = "cpu" if kept_on == "cpu" else p.device  # AdamW keeps `step` on the CPU
                        entry[key] = (value.reshape(()).to(home, dtype).clone() if scalar
                                      else value.view_as(p).to(dtype).clone())

    def release_state(self) -> None:
        """Drop the state of parameters this rank does not own."""
        for p in list(self.optimizer.state):
            if p not in self._owned:
                del self.optimizer.state[p]


def _by_dtype(params: List[torch.Tensor]) -> List[List[torch.Tensor]]:
    buckets: Dict[torch.dtype, List[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault(p.dtype, []).append(p)
    return list(buckets.values())
