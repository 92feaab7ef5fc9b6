"""Where each parameter of a rank's shard lies over the layout: one typed record per parameter, decided once.

When a shard is built, :meth:`Placements.build` turns the model's declarations
(``model/splits.py``) and the layout into a frozen :class:`Placement` per parameter:

* ``REPLICATED``: the whole tensor on every rank; its gradient sums over the data-parallel group;
* ``TENSOR``: this rank's slice along ``dim`` of ``split_group`` (the TP group);
* ``EXPERT``: this rank's block of routed experts along dim 0 of ``split_group`` (the EP group);
  its gradient sums over the expert-data-parallel group;
* ``PARTIAL_GRAD``: replicated, but each TP rank applies it to its own heads or sequence slice, so
  its gradient is first summed over ``partial_group`` (the TP group).

Initialisation (which slice a tensor is), gradient sync (which group), the gradient norm (which
group a squared norm sums over), ZeRO (dense and expert parameters shard over different groups)
and checkpoints (which parameters are DTensor shards) all read these records instead of probing
the tensors.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from megatron_vpmoe.model.splits import SplitKind, declared_split
from megatron_vpmoe.parallel.state import ParallelContext


class Kind(enum.Enum):
    REPLICATED = "replicated"
    TENSOR = "tensor"
    EXPERT = "expert"
    PARTIAL_GRAD = "partial_grad"


@dataclass(frozen=True)
class Placement:
    """One parameter's placement: its kind, split (``dim``, this rank's index, the split's size and
    group) and the groups its gradient sums over."""

    kind: Kind
    dim: Optional[int] = None  # the split dimension (TENSOR, EXPERT)
    rank: int = 0  # this rank's index in ``split_group``
    size: int = 1  # ranks the tensor is split over (1: this rank holds it whole)
    split_group: Any = None  # TP group (TENSOR), EP group (EXPERT)
    grad_group: Any = None  # the data-parallel group its gradient sums over (DP, or expert-DP)
    partial_group: Any = None  # PARTIAL_GRAD: the TP group its partial gradient sums over first

    @property
    def is_split(self) -> bool:
        """Whether this rank holds one of ``size`` equal slices rather than the whole tensor."""
        return self.size > 1

    @property
    def is_expert(self) -> bool:
        return self.kind is Kind.EXPERT

    @property
    def is_tensor_split(self) -> bool:
        """Split over the tensor-parallel group (more than one rank)."""
        return self.kind is Kind.TENSOR and self.size > 1


def place(p: torch.Tensor, ctx: ParallelContext) -> Placement:
    """The placement of parameter ``p`` under layout ``ctx`` (from the model's declaration)."""
    split = declared_split(p)
    if split is None:
        return Placement(Kind.REPLICATED, grad_group=ctx.dp_group)
    if split.kind is SplitKind.EXPERT:
        return Placement(Kind.EXPERT, 0, ctx.ep_rank, ctx.ep, ctx.ep_group if ctx.ep > 1 else None,
                         grad_group=ctx.expert_dp_group)
    if split.kind is SplitKind.TENSOR:
        if ctx.tp == 1:
            return Placement(Kind.REPLICATED, grad_group=ctx.dp_group)
        return Placement(Kind.TENSOR, split.dim, ctx.tp_rank, ctx.tp, ctx.tp_group, grad_group=ctx.dp_group)
    return Placement(Kind.PARTIAL_GRAD, grad_group=ctx.dp_group,
                     partial_group=ctx.tp_group if ctx.tp > 1 else None)


class Placements:
    """Every parameter's :class:`Placement` for one shard, looked up by the parameter or its name."""

    def __init__(self, module: torch.nn.Module, ctx: ParallelContext):
        self.ctx = ctx
        self._by_param = WeakIdKeyDictionary()
        self._by_name: Dict[str, Placement] = {}
        for name, p in module.named_parameters():
            where = place(p, ctx)
            self._by_param[p] = where
            self._by_name[name] = where

    def __getitem__(self, p: torch.Tensor) -> Placement:
        """The placement of parameter ``p`` of the shard (KeyError for a tensor that is not one)."""
        return self._by_param[p]

    def of_name(self, name: str) -> Optional[Placement]:
        """The placement of the parameter named ``name`` (single-process names), None if not here."""
        return self._by_name.get(name)

    def items(self) -> Iterator[Tuple[str, Placement]]:
        return iter(self._by_name.items())
