"""The distributed optimizer (``parallel.distributed_optimizer``): ZeRO-2 over data-parallel ranks.

AdamW's state (``exp_avg``/``exp_avg_sq``/``step``) is split over the ranks of the group that
reduces a parameter's gradient — the data-parallel group for dense parameters, the
expert-data-parallel group for routed experts — so each rank holds about ``1 / dp`` of it:

* **Row-split parameters**: a parameter that is not a TP/EP shard (the embedding, the output
  layer, the norms; every linear at TP=1, the routed experts at EP=1) with at least as many rows
  as the group has ranks is
  split by rows, ``torch.chunk``-style (DTensor's ``Shard(0)``): every rank steps its own rows
  through a view of them (the torch optimizer holds the view, so the state is rows-sized), and
  after the step every rank's rows are all-gathered back into the full parameter. The 206M-
  parameter embedding of the 6B design is spread over the DP ranks instead of landing on one.
  The all-gathers are asynchronous, one per decoder layer (an entry of a top-level module list
  such as ``layers``) and group and dtype, in forward order, after one for everything outside
  the layers (embedding, final norm, output layer: waited for by the first module that runs).
  The step launches the first ``PREFETCH``; a layer's forward pre-hook waits only for its own
  gather and the earlier ones, then launches the next ``PREFETCH``, so later layers' parameters
  arrive while earlier layers compute and only a few layers' gather buffers are alive at once
  (a checkpoint's staging waits for all first).
* **Whole parameters** (tensor- or expert-parallel shards, and anything too small to split):
  each lives on one rank (greedy by size), which steps it and broadcasts it to the group.

Gradients are reduce-scattered to this split (the constructor calls ``ParallelModel.shard_gradients(
optimizer.gradient_shard)``): the bucketed, backward-overlapped
reduction of ``parallel/grad_sync.py`` lays each bucket out as one segment per rank (its rows of
the bucket's row-split parameters, the whole parameters it owns) and each rank receives only the
summed gradient it steps, as the ``.grad`` of its row views and owned parameters; the
reduce-scatter plus the parameter all-gather move what the all-reduce alone moved before. Each
rank steps the rows / parameters it holds with exactly the unsharded optimizer's arithmetic.

TP/EP shards stay whole rather than being cut at flat-buffer boundaries: their state is already
a DTensor over the TP/EP group, and a flat range of it is not a rectangle the layout-independent
checkpoint format can name (that needs a 2-D TP/EP x DP placement). A bucket's segments are
padded to the largest, so a bucket holding one large whole shard (a layer's experts under EP>1
with expert-DP>1) sends padding as large as that shard; ``benchmarks/scale.py --only zero2``
reports the padding.

Checkpoints keep the layout-independent format without gathering anything: a row-split
parameter's state is a DTensor sharded by rows over the group (:meth:`state_as_sharded`), a whole
parameter's state is written by its owner, and a load fills exactly what this rank holds from
whatever layout the checkpoint was saved with (``megatron_vpmoe.training.checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_vpmoe.parallel.collectives import all_gather_single, coalesced
from megatron_vpmoe.parallel.model import sharded_dtensor


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


def row_chunk(rows: int, size: int, rank: int) -> Tuple[int, int]:
    """``[start, end)`` of ``rank``'s rows, as ``torch.chunk`` / DTensor ``Shard(0)`` split them."""
    step = -(-rows // size)
    return min(rank * step, rows), min((rank + 1) * step, rows)


def splits_by_rows(param: torch.Tensor, size: int, placed: bool) -> bool:
    """Whether ``param``'s state is split by rows over a group of ``size``: not ``placed`` (a
    shard of a TP/EP split: whole experts at EP=1 and TP-style linears at TP=1 are not) and
    every rank gets rows."""
    if size == 1 or param.dim() == 0 or placed:
        return False
    rows = param.shape[0]
    return row_chunk(rows, size, size - 1)[0] < rows


PREFETCH = 2  # row all-gathers launched ahead of the layer being waited for (each holds its buffers)


class _RowSplit:
    """One row-split parameter on this rank: its rows ``[start, end)`` and the view stepped."""

    def __init__(self, param: torch.Tensor, group, size: int, rank: int):
        self.param, self.group, self.size = param, group, size
        self.start, self.end = row_chunk(param.shape[0], size, rank)
        self.step_rows = -(-param.shape[0] // size)
        self.view = param.detach()[self.start:self.end]  # shares the parameter's storage


@dataclass
class _Gather:
    """One queued all-gather of a layer's updated rows (one group and dtype), launched ahead of its use."""

    layer: int  # the gather index of the layer (``_layer_indices``): waited for before its forward
    splits: List[_RowSplit]  # the row-split parameters it makes whole again, in buffer order
    work: Optional[object] = None  # the async collective's handle once launched
    received: Optional[torch.Tensor] = None  # every rank's padded rows, [size x chunk] flat


class DistributedOptimizer:
    """Wraps a torch optimizer built over all of this rank's parameters; see the module doc."""

    def __init__(self, optimizer: torch.optim.Optimizer, pm):
        """``optimizer``: over ``pm.module``'s parameters; ``pm``: the :class:`ParallelModel`, whose
        layout decides what is a TP/EP shard and whose gradients are then reduce-scattered to
        this optimizer's split (``pm.shard_gradients``)."""
        self.optimizer = optimizer
        module, dp_group, expert_dp_group = pm.module, pm.ctx.dp_group, pm.ctx.expert_dp_group
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        dense = [(n, p) for n, p in named if not pm.placements[p].is_expert]
        experts = [(n, p) for n, p in named if pm.placements[p].is_expert]
        # per reduction group: [(group, [params of owner 0], [params of owner 1], ...)]
        self._groups: List[Tuple[object, List[List[torch.Tensor]]]] = []
        self._owned: set = set()
        self._owner: Dict[torch.Tensor, Tuple[int, int]] = {}  # whole parameter -> (owner, group size)
        self._split: Dict[torch.Tensor, _RowSplit] = {}
        for params, group in ((dense, dp_group), (experts, expert_dp_group)):
            if not params:
                continue
            size = _group_size(group)
            me = 0 if size == 1 else dist.get_rank(group)
            whole = []
            for name, p in params:
                if splits_by_rows(p, size, pm.is_placed(p)):
                    self._split[p] = _RowSplit(p, group, size, me)
                else:
                    whole.append((name, p))
            owners = assign_owners(whole, size)
            by_owner: List[List[torch.Tensor]] = [[] for _ in range(size)]
            for name, p in whole:  # module order: the same on every rank of the group
                by_owner[owners[name]].append(p)
                self._owner[p] = (owners[name], size)
                if owners[name] == me:
                    self._owned.add(p)
            self._groups.append((group, by_owner))
        self._param_of = {id(s.view): p for p, s in self._split.items()}
        for group in optimizer.param_groups:  # the torch optimizer steps the row views
            group["params"] = [self._split[p].view if p in self._split else p for p in group["params"]]
        self._pending: List[_Gather] = []  # gathers not yet waited for, in layer order
        self._layer, entries = _layer_indices(module)  # parameter -> its gather's index, in forward order
        self._hooks = []
        waits = [(m, max(self._layer[p] for p in m.parameters(recurse=False) if p in self._split))
                 for m in module.modules() if any(p in self._split for p in m.parameters(recurse=False))]
        for m, upto in waits + entries:  # a module waits for its gather and the earlier ones
            self._hooks.append(m.register_forward_pre_hook(lambda *_, upto=upto: self.wait_for_parameters(upto)))
        pm.shard_gradients(self.gradient_shard)  # ZeRO-2: each rank receives only what it steps

    # -- the optimizer interface the trainer uses ----------------------------------------------
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self._split:  # the full gradient lives on the parameter, not on its view
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.wait_for_parameters()  # the reduce-scatter gave the row views and owned parameters their .grad
        try:
            self.optimizer.step()
        finally:
            for s in self._split.values():
                s.view.grad = None
        self._broadcast_parameters()
        self._launch_row_gathers()

    # -- what this rank holds ---------------------------------------------------------------------
    def gradient_shard(self, param: torch.Tensor):
        """How ``param``'s reduced gradient is split over its group (``ParallelModel.shard_gradients``):
        each group rank's flat ``[start, end)`` of it (empty where a rank holds none), and the
        tensor whose ``.grad`` takes this rank's part (its row view, the owned parameter, or None)."""
        split = self._split.get(param)
        if split is not None:
            row = param[0].numel()
            return [(a * row, b * row) for a, b in (row_chunk(param.shape[0], split.size, r)
                                                    for r in range(split.size))], split.view
        owner, size = self._owner[param]
        return [(0, param.numel()) if r == owner else (0, 0) for r in range(size)], \
            (param if param in self._owned else None)

    def owns(self, param: torch.Tensor) -> bool:
        """Whether this rank holds (steps, saves and loads) optimizer state of ``param`` (its rows
        of a row-split parameter, or the whole of an owned one)."""
        return param in self._owned or param in self._split

    def param_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The model parameter a tensor of the torch optimizer's groups stands for."""
        return self._param_of.get(id(tensor), tensor)

    def state_of(self, param: torch.Tensor) -> dict:
        """This rank's optimizer state of ``param`` (its rows for a row-split one)."""
        tensor = self._split[param].view if param in self._split else param
        return self.optimizer.state.get(tensor, {})

    def owned_state_numel(self) -> int:
        """Elements of optimizer-state tensors held by this rank (what ZeRO shards)."""
        return sum(t.numel() for s in self.optimizer.state.values() for key, t in s.items()
                   if isinstance(t, torch.Tensor) and key != "step")

    def state_as_sharded(self, fqn: str, tensor: torch.Tensor, value, as_sharded):
        """A state entry of ``tensor`` as the checkpoint writes it: rows-sized state of a
        row-split parameter as a DTensor sharded by rows over its group (global shape = the
        parameter's), anything else through the model's ``as_sharded``."""
        param = self.param_of(tensor)
        split = self._split.get(param)
        if split is None or not isinstance(value, torch.Tensor) or value.shape != split.view.shape:
            return as_sharded(fqn, value)
        return sharded_dtensor(value, split.group, 0, param.shape)

    # -- communication -------------------------------------------------------------------------
    def _broadcast_parameters(self) -> None:
        for group, by_owner in self._groups:
            if _group_size(group) == 1:
                continue
            for owner, params in enumerate(by_owner):
                for bucket in _by_dtype(params):
                    coalesced(bucket, lambda flat: dist.broadcast(flat, group_src=owner, group=group))

    def _launch_row_gathers(self) -> None:
        """Queue one all-gather per (layer, group, dtype) of every rank's updated rows, in forward
        order, and launch the first ``PREFETCH``; the rest launch as earlier layers are waited for."""
        by_key: Dict[tuple, List[_RowSplit]] = {}
        for s in self._split.values():
            by_key.setdefault((self._layer[s.param], id(s.group), s.param.dtype), []).append(s)
        self._pending = [_Gather(layer, splits) for (layer, _, _), splits
                         in sorted(by_key.items(), key=lambda item: item[0][0])]
        self._prefetch(PREFETCH)

    def _prefetch(self, count: int) -> None:
        """Launch the first ``count`` queued gathers not launched yet (each rank's part padded to
        the largest chunk); every rank launches them in the same order."""
        for gather in self._pending:
            if count <= 0:
                break
            if gather.work is not None:
                continue
            splits = gather.splits
            parts = []
            for s in splits:
                row = s.param[0].numel()
                local = s.view.reshape(-1)
                pad = s.step_rows * row - local.numel()
                parts.append(local if pad == 0 else torch.cat([local, local.new_zeros(pad)]))
            send = torch.cat(parts)
            gather.received = send.new_empty(splits[0].size * send.numel())
            gather.work = all_gather_single(gather.received, send, group=splits[0].group, async_op=True)
            count -= 1

    @torch.no_grad()
    def wait_for_parameters(self, upto: Optional[int] = None) -> None:
        """Finish the row all-gathers of layers ``<= upto`` (default all; launching them first
        where needed): their row-split parameters whole again; then launch the next ``PREFETCH``."""
        done = [gather for gather in self._pending if upto is None or gather.layer <= upto]
        if not done:
            return
        self._prefetch(len(done))  # the queue is in layer order: these are its head
        self._pending = self._pending[len(done):]
        for gather in done:
            gather.work.wait()
            splits = gather.splits
            per_rank = gather.received.view(splits[0].size, -1)
            offset = 0
            for s in splits:
                row = s.param[0].numel()
                n = s.step_rows * row
                flat = s.param.detach().view(s.param.shape[0], -1)
                for r in range(s.size):
                    start, end = row_chunk(s.param.shape[0], s.size, r)
                    flat[start:end].copy_(per_rank[r, offset:offset + (end - start) * row].view(end - start, row))
                offset += n
        self._prefetch(PREFETCH)


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that steps: a :class:`DistributedOptimizer`'s inner one, or ``optimizer``."""
    return optimizer.optimizer if isinstance(optimizer, DistributedOptimizer) else optimizer


def _layer_indices(module: torch.nn.Module) -> Tuple[Dict[torch.Tensor, int], List[Tuple[torch.nn.Module, int]]]:
    """Each parameter's gather index: ``1 + i`` for the ``i``-th entry of a top-level module
    list/dict (a decoder layer, ``layers.3``), 0 for everything else (the embedding, the final
    norm, the output layer: their weights may be read outside their module's forward, as the
    head reads the output weight, so they are waited for with the first layer); and the entries
    with their index (each waits for its gather before it runs)."""
    containers = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)
    entries: Dict[str, Tuple[torch.nn.Module, int]] = {}
    for name, child in module.named_children():
        if isinstance(child, containers):
            for key, entry in child.named_children():
                entries[f"{name}.{key}"] = (entry, 1 + len(entries))
    out: Dict[torch.Tensor, int] = {}
    for name, p in module.named_parameters():
        entry = entries.get(".".join(name.split(".")[:2]))
        out[p] = 0 if entry is None else entry[1]
    return out, list(entries.values())


def _by_dtype(params: List[torch.Tensor]) -> List[List[torch.Tensor]]:
    buckets: Dict[torch.dtype, List[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault(p.dtype, []).append(p)
    return list(buckets.values())
