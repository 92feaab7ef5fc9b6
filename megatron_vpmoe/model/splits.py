"""How the model declares a parameter's split (TP on a dim, expert shard, partial gradient); ``parallel/`` places it.

The model layer knows which of its weights a layout may split and how, but not the layout: a
module declares each such parameter once, when it creates it, with :func:`declare_tensor_parallel`
(this rank holds one slice along ``dim`` of the tensor-parallel split), :func:`declare_expert`
(``[local experts, ...]``: a block of the routed experts) or :func:`declare_partial_grad`
(replicated, but each tensor-parallel rank applies it to its own heads or sequence slice, so its
gradient is a partial sum). The declarations sit in a registry keyed by the parameter object (no
attributes on the tensor); ``megatron_vpmoe.parallel.placement`` reads them through
:func:`declared_split` once, when a shard is built, and turns them into the layout's placement
(with its process groups) that initialisation, gradient sync, the norm, ZeRO and checkpoints use.
An undeclared parameter is replicated.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary


class SplitKind(enum.Enum):
    TENSOR = "tensor"  # one slice along ``dim`` per tensor-parallel rank
    EXPERT = "expert"  # routed experts: a block of them (dim 0) per expert-parallel rank
    PARTIAL_GRAD = "partial_grad"  # replicated; the gradient is summed over the tensor-parallel group


@dataclass(frozen=True)
class Split:
    """A parameter's declared split (``dim``: the split dimension of TENSOR and EXPERT)."""

    kind: SplitKind
    dim: Optional[int] = None


# parameter (by identity; a tensor's == is elementwise) -> its declaration, forgotten with the parameter
_DECLARED = WeakIdKeyDictionary()


def declare_tensor_parallel(param: torch.Tensor, dim: int) -> None:
    """``param`` is this rank's slice along ``dim`` of a tensor-parallel split."""
    _DECLARED[param] = Split(SplitKind.TENSOR, dim)


def declare_expert(param: torch.Tensor) -> None:
    """``param`` holds this rank's routed experts along dim 0."""
    _DECLARED[param] = Split(SplitKind.EXPERT, 0)


def declare_partial_grad(param: torch.Tensor) -> None:
    """``param`` is replicated but applied to this rank's part only: sum its gradient over TP."""
    _DECLARED[param] = Split(SplitKind.PARTIAL_GRAD)


def declared_split(param: torch.Tensor) -> Optional[Split]:
    """What the model declared for ``param`` (None: replicated)."""
    return _DECLARED.get(param)


def is_expert(param: torch.Tensor) -> bool:
    """Whether ``param`` holds routed experts (``[local experts, ...]``)."""
    split = _DECLARED.get(param)
    return split is not None and split.kind is SplitKind.EXPERT
