"""Data-parallel gradient reduction overlapped with backward: size-bounded buckets launched from hooks.

Parameters whose gradients are reduced over a group (dense ones over the data-parallel group,
routed experts over the expert-data-parallel group) are packed, in reverse registration order
(roughly the order backward produces their gradients), into buckets of at most
``parallel.bucket_mb`` per group and dtype. Each bucket owns one flat gradient buffer: a
parameter's post-accumulate-grad hook adds its gradient into its slice and frees it. When every
parameter of a bucket has delivered the last micro-batch's gradient, the bucket's all-reduce is
launched asynchronously while backward goes on with earlier layers; :meth:`GradSync.finish`
waits for all of them (launching any bucket a parameter never reached) and points each
``param.grad`` at its reduced slice. No full-model ``torch.cat`` copy, and the first collective
starts during backward (``trace`` records the order for tests).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist


class _Bucket:
    def __init__(self, index: int, params: List[torch.nn.Parameter], group, dtype: torch.dtype, device):
        self.index, self.params, self.group = index, params, group
        self.offsets: Dict[int, Tuple[int, int]] = {}
        offset = 0
        for p in params:
            self.offsets[id(p)] = (offset, p.numel())
            offset += p.numel()
        self.buffer = torch.zeros(offset, dtype=dtype, device=device)
        self.pending = 0
        self.work = None

    def view(self, p) -> torch.Tensor:
        start, n = self.offsets[id(p)]
        return self.buffer[start:start + n].view_as(p)


class GradSync:
    """Bucketed, hook-driven gradient all-reduce for one rank's parameters (see module doc)."""

    def __init__(self, named_groups: List[Tuple[torch.nn.Parameter, object]], bucket_bytes: int):
        self.buckets: List[_Bucket] = []
        self._bucket_of: Dict[int, _Bucket] = {}
        self._calls: Dict[int, int] = {}
        self._expected = 1
        self._active = False
        self.trace: List[Tuple[str, int]] = []  # ("launch", bucket index) / ("finish", -1)
        by_key: Dict[tuple, List[torch.nn.Parameter]] = {}
        for p, group in reversed(named_groups):  # backward visits the last layers first
            by_key.setdefault((id(group), p.dtype, p.device), []).append((p, group))
        for items in by_key.values():
            current: List[torch.nn.Parameter] = []
            size = 0
            group = items[0][1]
            for p, _ in items:
                current.append(p)
                size += p.numel() * p.element_size()
                if size >= bucket_bytes:
                    self._add_bucket(current, group)
                    current, size = [], 0
            if current:
                self._add_bucket(current, group)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook)
                         for b in self.buckets for p in b.params]

    def _add_bucket(self, params, group) -> None:
        bucket = _Bucket(len(self.buckets), params, group, params[0].dtype, params[0].device)
        self.buckets.append(bucket)
        for p in params:
            self._bucket_of[id(p)] = bucket

    @property
    def params(self) -> List[torch.nn.Parameter]:
        return [p for b in self.buckets for p in b.params]

    def start(self, micro_batches: int) -> None:
        """Before a step's backward passes: zero the buffers; a bucket launches once each of its
        parameters has accumulated ``micro_batches`` gradients."""
        self._expected = micro_batches
        self._active = True
        self.trace.clear()
        for b in self.buckets:
            b.buffer.zero_()
            b.pending = len(b.params)
            b.work = None
        for p in self.params:
            self._calls[id(p)] = 0
            p.grad = None

    @torch.no_grad()
    def _hook(self, p: torch.nn.Parameter) -> None:
        if not self._active or p.grad is None:
            return
        bucket = self._bucket_of[id(p)]
        bucket.view(p).add_(p.grad)
        p.grad = None
        self._calls[id(p)] += 1
        if self._calls[id(p)] == self._expected:
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        self.trace.append(("launch", bucket.index))
        bucket.work = dist.all_reduce(bucket.buffer, group=bucket.group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket's reduction (launching the ones not yet launched) and expose the
        reduced gradients as ``param.grad``."""
        for bucket in self.buckets:
            if bucket.work is None:
                self._launch(bucket)
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.work = None
            for p in bucket.params:
                p.grad = bucket.view(p)
        self.trace.append(("finish", -1))
        self._active = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def build_grad_sync(module: torch.nn.Module, dp_group, expert_dp_group, bucket_mb: float) -> Optional[GradSync]:
    """A :class:`GradSync` over ``module``'s parameters that need a data-parallel reduction
    (None when none does: a single data-parallel replica)."""
    def size(group) -> int:
        return 1 if group is None else dist.get_world_size(group)

    pairs = []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        group = expert_dp_group if getattr(p, "expert_parallel", False) else dp_group
        if size(group) > 1:
            pairs.append((p, group))
    if not pairs:
        return None
    return GradSync(pairs, max(1, int(bucket_mb * 2**20)))
