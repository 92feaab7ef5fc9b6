"""Tensor-parallel linear layers for the model's :class:`LinearSpec` (megatron-core's, or
Transformer Engine's) and sequence parallelism's region boundaries.

The wrappers return only the output (bias added inside) and keep the parameter names
``weight``/``bias``, so state-dict keys match the single-process model. Shards are declared
(``model/splits.py``) with their split dim, from which ``parallel/placement.py`` places them.

Sequence parallelism (``parallel.sequence_parallel``) splits the residual stream, the norms
and dropout along the sequence over the TP group. Activations are batch-first ``[b, s, h]``
and megatron-core's sequence-parallel linears gather along dim 0 (``[s, b, h]``), so the
linears here keep megatron-core's parameters but do no communication; the layer calls the
boundaries (:class:`SplitSequence`) around them: an all-gather along dim 1 into attention and
the MLP (reduce-scatter of the input gradients in backward), a reduce-scatter of the row
linear's partial sums out of them (all-gather in backward). The collectives are PyTorch's
differentiable functional ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron_vpmoe.model.layers import LinearSpec
from megatron_vpmoe.model.splits import declare_partial_grad, declare_tensor_parallel
from megatron_vpmoe.parallel.collectives import all_gather_single


def replicated_linear(tp_group):
    """A whole linear on every TP rank feeding only the rank's own heads (TPA's dim factors):
    megatron-core's copy-to-TP-region on its input (identity forward, input gradient summed over
    the group in backward); its weight gradient is partial (tagged by the model)."""
    class Replicated(nn.Linear):
        def forward(self, x):
            # imported here: megatron-core must not load while a TE spec is built (its import probes TE)
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            return F.linear(copy_to_tensor_model_parallel_region(x, group=tp_group), self.weight, self.bias)

    return lambda i, o, bias: Replicated(i, o, bias=bias)


def tensor_parallel_spec(tp_size: int, tp_group, params_dtype=torch.float32,
                         sequence_parallel: bool = False, tp_rank: int = 0) -> LinearSpec:
    """Column/row-parallel linears over ``tp_group`` (megatron-core ``ColumnParallelLinear``/
    ``RowParallelLinear``); ``sequence_parallel``: their non-communicating variants with the
    region boundaries that split the sequence (module doc); ``tp_rank``: this rank's index in
    the group (which heads' ALiBi slopes it takes)."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    config = ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                                 perform_initialization=False, params_dtype=params_dtype)

    def no_init(weight):
        return None

    class Column(ColumnParallelLinear):
        def __init__(self, i, o, bias):
            super().__init__(i, o, config=config, init_method=no_init, bias=bias,
                             gather_output=False, tp_group=tp_group)
            declare_tensor_parallel(self.weight, 0)
            if bias:
                declare_tensor_parallel(self.bias, 0)

        def forward(self, x):
            return super().forward(x)[0]

    class Row(RowParallelLinear):
        def __init__(self, i, o, bias):
            super().__init__(i, o, config=config, init_method=no_init, bias=bias,
                             input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
            declare_tensor_parallel(self.weight, 1)

        def forward(self, x):
            return super().forward(x)[0]

    spec = LinearSpec(column=Column, row=Row, tp_size=tp_size, tp_rank=tp_rank,
                      replicated=replicated_linear(tp_group))
    if not sequence_parallel:
        return spec

    class SequenceParallelColumn(Column):
        """Column shard on an input the layer already gathered: no communication."""

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    class SequenceParallelRow(Row):
        """Row shard's partial sums, reduced by the layer's reduce-scatter; the bias is added
        once (by TP rank 0) before that sum, so its gradient is a partial sum as well."""

        def __init__(self, i, o, bias):
            super().__init__(i, o, bias)
            if bias:
                declare_partial_grad(self.bias)

        def forward(self, x):
            out = F.linear(x, self.weight)
            if self.bias is not None and dist.get_rank(tp_group) == 0:
                out = out + self.bias
            return out

    # TPA's whole dim-factor linear: the layer's gather already sums its input gradient over TP
    # in backward (reduce-scatter, or the copy-to region on the whole sequence), so it is plain
    return LinearSpec(column=SequenceParallelColumn, row=SequenceParallelRow, tp_size=tp_size, tp_rank=tp_rank,
                      replicated=lambda i, o, bias: nn.Linear(i, o, bias=bias),
                      sequence_parallel=SequenceParallel(tp_group, tp_size), tensor_parallel=spec)


def _all_gather_seq(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 1 (rank order)."""
    parts = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))
    all_gather_single(parts, x.contiguous(), group=group)
    return torch.cat(parts.chunk(size, 0), dim=1)


class _SliceForward(torch.autograd.Function):
    """Forward: this rank's slice of dim 1; backward: all-gather along dim 1."""

    @staticmethod
    def forward(ctx, x, group, size, rank):
        ctx.group, ctx.size = group, size
        step = x.shape[1] // size
        return x.narrow(1, rank * step, step).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group, ctx.size), None, None, None


class _GatherForward(torch.autograd.Function):
    """Forward: all-gather along dim 1; backward: this rank's slice (every rank's gradient of
    the gathered tensor is the same: the consumer computed the same thing on every rank)."""

    @staticmethod
    def forward(ctx, x, group, size, rank):
        ctx.size, ctx.rank = size, rank
        return _all_gather_seq(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        step = grad.shape[1] // ctx.size
        return grad.narrow(1, ctx.rank * step, step).contiguous(), None, None, None


class SplitSequence:
    """The region boundaries with the sequence split over the TP group (see ``model.layers.WholeSequence``)."""

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def to_full(self, x):
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_gather_single_autograd(x.contiguous(), 1, self.group)

    def from_partial(self, x):
        from torch.distributed import _functional_collectives as funcol

        return funcol.reduce_scatter_single_autograd(x.contiguous(), "sum", 1, self.group)

    def to_full_replicated(self, x):
        return _GatherForward.apply(x, self.group, self.size, self.rank)

    def to_local(self, x):
        return _SliceForward.apply(x, self.group, self.size, self.rank)


class WholeSequenceTP:
    """The boundaries with the whole sequence on every rank, for the non-communicating linears of
    a sequence-parallel spec (KV-cache generation steps, lengths the TP size does not divide):
    megatron-core's copy-to (backward all-reduce) and reduce-from (forward all-reduce) regions."""

    size = 1

    def __init__(self, group):
        self.group = group

    def to_full(self, x):
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(x, group=self.group)

    def from_partial(self, x):
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        return reduce_from_tensor_model_parallel_region(x, group=self.group)

    def to_full_replicated(self, x):
        return x

    def to_local(self, x):
        return x


class SequenceParallel:
    """What a sequence-parallel :class:`LinearSpec` carries: its two sets of boundaries."""

    def __init__(self, group, size: int):
        self.size = size
        self.split = SplitSequence(group, size)
        self.whole = WholeSequenceTP(group)


def te_linear_spec(tp_size: int, tp_group, tp_rank: int = 0) -> LinearSpec:
    """Transformer Engine ``Linear`` layers (``train.transformer_impl: transformer_engine``):
    plain at TP=1, column/row-parallel over ``tp_group`` otherwise (TE splits the weight the
    same way as megatron-core: column on the output dim, row on the input dim, bias of a row
    layer added after the reduction). Requires TE (a clear error otherwise)."""
    from megatron_vpmoe.kernels import te

    if tp_size == 1:
        return LinearSpec(column=lambda i, o, b: te.linear(i, o, b, use_te=True),
                          row=lambda i, o, b: te.linear(i, o, b, use_te=True), tp_size=1)

    def column(i, o, bias):
        layer = te.linear(i, o, bias, use_te=True, parallel_mode="column", tp_group=tp_group, tp_size=tp_size)
        declare_tensor_parallel(layer.weight, 0)
        if bias:
            declare_tensor_parallel(layer.bias, 0)
        return layer

    def row(i, o, bias):
        layer = te.linear(i, o, bias, use_te=True, parallel_mode="row", tp_group=tp_group, tp_size=tp_size)
        declare_tensor_parallel(layer.weight, 1)
        return layer

    return LinearSpec(column=column, row=row, tp_size=tp_size, tp_rank=tp_rank,
                      replicated=replicated_linear(tp_group))
