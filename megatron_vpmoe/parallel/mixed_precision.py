"""bf16 weights over fp32 master weights (``train.precision: bf16`` with ``train.master_weights``).

The parameters at rest are the fp32 master weights: the optimizer (and ZeRO's shards of it), the
gradient norm, clipping, checkpoints, resharding and ``convert to-hf`` see fp32 tensors exactly as
in an fp32 run. For a step's forward and backward (:meth:`Bf16Weights.begin` .. :meth:`end`) every
parameter except the routers' (their scores stay fp32) points at a persistent bf16 copy,
refreshed from the master with one cast per parameter per step (one ``_foreach_copy_``), so
autocast finds bf16 weights and casts nothing per use and per micro-batch. 1-D parameters (norm
scales, biases, attention sinks, mixing scalars: under 1% of the bytes, and the norms compute in
fp32 anyway) stay fp32 as well: rounding a norm scale near 1 to bf16 (steps of 1/128) moved the
tiny config's loss curve further from fp32's than the matmuls did. Backward runs outside autocast
(``ParallelModel._backward``) so each op's backward keeps its forward's dtypes. Gradients go to fp32
``main_grad`` slots as soon as autograd produces them (a post-accumulate-grad hook adds the bf16
``.grad`` into the slot and frees it): the data-parallel buckets' fp32 buffers
(``parallel/grad_sync.py``, built while the parameters are fp32) for parameters they reduce, a
per-parameter fp32 slot for the others; no second full-model fp32 gradient beside them. After
backward :meth:`end` points the parameters back at the master and the slots become their
``.grad`` for the optimizer.

Under ZeRO (``parallel.distributed_optimizer``) the master rows other ranks step arrive by the
optimizer's all-gather: :meth:`begin` first waits for it (``before``), so the master is whole
before it is cast.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

BF16 = torch.bfloat16


def keeps_fp32(module: torch.nn.Module) -> List[torch.nn.Parameter]:
    """Parameters that stay fp32 in the forward besides the 1-D ones: the MoE routers' (scores,
    top-k in fp32)."""
    from megatron_vpmoe.model.moe import Router

    return [p for m in module.modules() if isinstance(m, Router) for p in m.parameters(recurse=False)]


class Bf16Weights:
    """bf16 working weights for ``module``'s fp32 matrices (>= 2-D, routers excepted) during a
    step (see module doc)."""

    def __init__(self, module: torch.nn.Module, before: Optional[Callable[[], None]] = None):
        fp32 = {id(p) for p in keeps_fp32(module)}
        self.params = [p for p in module.parameters()
                       if p.dtype == torch.float32 and p.dim() >= 2 and id(p) not in fp32]
        self.before = before
        self._bf16: Optional[List[torch.Tensor]] = None
        self._master: Dict[int, torch.Tensor] = {}
        self._slot: Dict[int, torch.Tensor] = {}  # fp32 gradients of parameters outside the buckets
        self._skip: set = set()  # parameters whose gradients the buckets take
        self._active = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook)
                         for p in self.params if p.requires_grad]

    @property
    def active(self) -> bool:
        return self._active

    def bf16_bytes(self) -> int:
        """Bytes of the bf16 working weights (what one cast per step writes)."""
        return sum(p.numel() for p in self.params) * 2

    @torch.no_grad()
    def begin(self, bucketed=()) -> None:
        """Cast the master into the bf16 weights (once) and point the parameters at them;
        ``bucketed``: the parameters whose gradients the data-parallel buckets accumulate."""
        if self._active:
            return
        if self.before is not None:
            self.before()
        if self._bf16 is None:
            self._bf16 = [torch.empty_like(p, dtype=BF16) for p in self.params]
        torch._foreach_copy_(self._bf16, [p.data for p in self.params])
        self._skip = {id(p) for p in bucketed}
        self._slot = {}
        for p, w in zip(self.params, self._bf16):
            self._master[id(p)] = p.data
            p.data = w
        self._active = True

    @torch.no_grad()
    def _hook(self, p: torch.nn.Parameter) -> None:
        if not self._active or p.grad is None or id(p) in self._skip:
            return
        slot = self._slot.get(id(p))
        if slot is None:
            self._slot[id(p)] = p.grad.float()
        else:
            slot.add_(p.grad)
        p.grad = None

    @torch.no_grad()
    def end(self) -> None:
        """Point the parameters back at their fp32 master; their fp32 gradients become ``.grad``
        (the buckets' slices, set later by the buckets' ``finish``, or this rank's own slots)."""
        if not self._active:
            return
        for p in self.params:
            p.data = self._master.pop(id(p))
            main = p.__dict__.pop("main_grad", None)  # a bucket exposed it while p was bf16
            slot = self._slot.pop(id(p), None)
            if main is not None:
                p.grad = main
            elif slot is not None:
                p.grad = slot
            elif p.grad is not None and p.grad.dtype != p.dtype:
                p.grad = p.grad.float()
        self._active = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
