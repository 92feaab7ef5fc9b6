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
starts during backward (an ``observer`` callable, when set, is told each launch in order).

**Sharded gradients (ZeRO-2, ``parallel.distributed_optimizer``).** Given ``shard_of`` (the
distributed optimizer's split: per parameter, each group rank's flat ``[start, end)`` of it and
the tensor whose ``.grad`` takes this rank's part), a bucket's buffer is laid out as one
equal-size segment per group rank, each holding that rank's parts of the bucket's parameters
(padded to the largest segment), and the bucket launches a ``reduce_scatter`` instead of the
all-reduce: each rank receives only the summed gradient it steps. Micro-batches still accumulate
into the full buffer and only the last one launches; the full buffer is freed once its
reduce-scatter is done and allocated again at the bucket's first gradient of the next step. At
most ``IN_FLIGHT`` reduce-scatters are outstanding: launching one more first waits for the
oldest (launched a bucket's worth of backward earlier, so mostly finished; gloo's reduce-scatter
cannot be polled for completion), so during backward a rank holds its received segments (1/DP of
the gradients) plus a few full buckets, not a second full copy. With several micro-batches every
full buffer has to live through the accumulation anyway: then the buffers are kept and each
bucket is reduce-scattered in place into this rank's own segment (Megatron's layout), one copy of
the gradients instead of that plus the received segments.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_vpmoe.parallel.collectives import reduce_scatter_single

# shard_of(param) -> (each group rank's flat [start, end) of param, the tensor whose .grad takes
# this rank's part or None)
ShardFn = Callable[[torch.Tensor], Tuple[List[Tuple[int, int]], Optional[torch.Tensor]]]


IN_FLIGHT = 2  # sharded: reduce-scatters outstanding at once (each holds its full bucket buffer)


def _set_grad(t: torch.Tensor, grad: torch.Tensor) -> None:
    """``t.grad = grad``, or ``t.main_grad`` while ``t`` holds a step's bf16 working weight and the
    bucket fp32 (``parallel/mixed_precision.py`` makes it ``.grad`` when ``t`` is fp32 again)."""
    if t.dtype == grad.dtype:
        t.grad = grad
    else:
        t.main_grad = grad


class _Bucket:
    """One bucket's flat gradient buffer. ``pieces[id(p)]``: where ``p``'s flat gradient goes,
    as ``(buffer offset, start, end)``; unsharded, one piece per parameter, sharded one per
    group rank (in that rank's segment); ``mine``: ``(param, target, offset in the received
    segment, start, end)`` of this rank's parts."""

    def __init__(self, index: int, params: List[torch.nn.Parameter], group, shard_of: Optional[ShardFn]):
        self.index, self.params, self.group = index, params, group
        self.dtype, self.device = params[0].dtype, params[0].device
        self.pieces: Dict[int, List[Tuple[int, int, int]]] = {}
        self.mine: List[tuple] = []
        self.sharded = shard_of is not None
        if not self.sharded:
            offset = 0
            for p in params:
                self.pieces[id(p)] = [(offset, 0, p.numel())]
                offset += p.numel()
            self.numel, self.segment = offset, offset
        else:
            size, me = dist.get_world_size(group), dist.get_rank(group)
            splits = [(p, *shard_of(p)) for p in params]
            lengths = [0] * size
            for p, ranges, target in splits:
                for r, (start, end) in enumerate(ranges):
                    lengths[r] += end - start
            self.segment = max(lengths)
            self.numel = self.segment * size
            filled = [0] * size
            for p, ranges, target in splits:
                self.pieces[id(p)] = []
                for r, (start, end) in enumerate(ranges):
                    if end > start:
                        self.pieces[id(p)].append((r * self.segment + filled[r], start, end))
                        if r == me:
                            self.mine.append((p, target, filled[r], start, end))
                        filled[r] += end - start
            self.me = me
        self.received: Optional[torch.Tensor] = None  # one micro-batch: this rank's reduced segment
        self.keep = False  # accumulating: the buffer is kept and reduce-scattered in place
        self.out: Optional[torch.Tensor] = None  # where the last reduction's result is
        self.padding = self.numel - sum(p.numel() for p in params)  # elements sent but not gradients
        self.buffer: Optional[torch.Tensor] = None
        self.pending = 0
        self.work = None
        self.done = False  # reduced and exposed this step

    def ensure_buffer(self) -> None:
        if self.buffer is None:
            self.buffer = torch.zeros(self.numel, dtype=self.dtype, device=self.device)

    def add(self, p, grad: torch.Tensor) -> None:
        self.ensure_buffer()
        flat = grad.reshape(-1)
        for offset, start, end in self.pieces[id(p)]:
            self.buffer[offset:offset + end - start].add_(flat[start:end])

    def launch(self):
        self.ensure_buffer()
        if self.sharded:
            if self.keep:  # in place: this rank's own segment of the kept buffer
                self.out = self.buffer[self.me * self.segment:(self.me + 1) * self.segment]
            else:
                if self.received is None:
                    self.received = torch.empty(self.segment, dtype=self.dtype, device=self.device)
                self.out = self.received
            return reduce_scatter_single(self.out, self.buffer, group=self.group, async_op=True)
        return dist.all_reduce(self.buffer, group=self.group, async_op=True)

    def expose(self) -> None:
        """After the reduction: the reduced gradient as ``.grad`` of what this rank holds."""
        if not self.sharded:
            for p in self.params:
                (offset, _, n), = self.pieces[id(p)]
                _set_grad(p, self.buffer[offset:offset + n].view_as(p))
            return
        for p, target, offset, start, end in self.mine:
            _set_grad(target, self.out[offset:offset + end - start].view_as(target))
        if not self.keep:
            self.buffer = None  # the full buffer is only needed during backward

    def complete(self) -> int:
        self.work.wait()
        self.work = None
        self.expose()
        self.done = True
        return self.index


class GradSync:
    """Bucketed, hook-driven gradient all-reduce for one rank's parameters (see module doc)."""

    def __init__(self, named_groups: List[Tuple[torch.nn.Parameter, object]], bucket_bytes: int,
                 shard_of: Optional[ShardFn] = None, overlap: bool = True):
        self.shard_of, self.overlap = shard_of, overlap
        self.buckets: List[_Bucket] = []
        self._bucket_of: Dict[int, _Bucket] = {}
        self._calls: Dict[int, int] = {}
        self._expected = 1
        self._active = False
        # told each event in order: ("launch" / "done", bucket index), ("backward_done" / "finish", -1)
        self.observer: Optional[Callable[[str, int], None]] = None
        self._launched: List[_Bucket] = []  # launched, not yet completed, oldest first
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
        bucket = _Bucket(len(self.buckets), params, group, self.shard_of)
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
        self._launched = []
        for b in self.buckets:
            if b.sharded:
                b.keep = micro_batches > 1
                if b.keep:
                    b.received = None
            if b.buffer is not None:  # unsharded / accumulating: the buffer is kept
                b.buffer.zero_()
            b.pending = len(b.params)
            b.work, b.done = None, False
            for _, target, *_ in b.mine:
                target.grad = None
        for p in self.params:
            self._calls[id(p)] = 0
            p.grad = None

    @torch.no_grad()
    def _hook(self, p: torch.nn.Parameter) -> None:
        if not self._active or p.grad is None:
            return
        bucket = self._bucket_of[id(p)]
        bucket.add(p, p.grad)
        p.grad = None
        self._calls[id(p)] += 1
        if self._calls[id(p)] == self._expected:
            bucket.pending -= 1
            if bucket.pending == 0 and self.overlap:
                self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        self._note("launch", bucket.index)
        bucket.work = bucket.launch()
        self._launched.append(bucket)
        if self.shard_of is not None and self._expected == 1:  # bound the full buffers alive: finish the oldest
            while len(self._launched) > IN_FLIGHT:
                self._note("done", self._launched.pop(0).complete())

    def finish(self) -> None:
        """Wait for every bucket's reduction (launching the ones not yet launched) and expose the
        reduced gradients as ``param.grad`` (sharded: this rank's parts as its targets' ``.grad``).
        Called once the step's backward passes are done."""
        self._note("backward_done", -1)
        for bucket in self.buckets:
            if bucket.work is None and not bucket.done:
                self._launch(bucket)
        for bucket in self.buckets:
            if not bucket.done:
                bucket.complete()
        self._launched = []
        self._note("finish", -1)
        self._active = False

    def _note(self, event: str, index: int) -> None:
        if self.observer is not None:
            self.observer(event, index)

    def held(self) -> List[Tuple[torch.Tensor, torch.nn.Parameter]]:
        """``(tensor holding a reduced gradient, its parameter)`` for every gradient of the buckets
        this rank holds after :meth:`finish`: each parameter, or (sharded) this rank's parts."""
        if self.shard_of is None:
            return [(p, p) for p in self.params]
        return [(target, p) for b in self.buckets for p, target, *_ in b.mine]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def build_grad_sync(module: torch.nn.Module, group_of: Callable[[torch.nn.Parameter], object], bucket_mb: float,
                    shard_of: Optional[ShardFn] = None, overlap: bool = True) -> Optional[GradSync]:
    """A :class:`GradSync` over ``module``'s parameters that need a data-parallel reduction
    (None when none does: a single data-parallel replica); ``group_of(param)``: the group its
    gradient sums over (its placement's ``grad_group``); ``shard_of``: reduce-scatter to that
    split; ``overlap=False``: launch every bucket after backward instead of during it."""
    def size(group) -> int:
        return 1 if group is None else dist.get_world_size(group)

    pairs = []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        group = group_of(p)
        if size(group) > 1:
            pairs.append((p, group))
    if not pairs:
        return None
    return GradSync(pairs, max(1, int(bucket_mb * 2**20)), shard_of, overlap)
