"""Tensor-parallel linear layers for the model's :class:`LinearSpec`: megatron-core's, or Transformer Engine's.

The wrappers return only the output (bias added inside) and keep the parameter names
``weight``/``bias``, so state-dict keys match the single-process model. Shards are tagged
with ``tensor_model_parallel``/``partition_dim`` for sharding and gathering full state dicts.
"""

from __future__ import annotations

import torch

import torch.nn as nn
import torch.nn.functional as F

from megatron_vpmoe.model.layers import LinearSpec, mark_tensor_parallel


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


def tensor_parallel_spec(tp_size: int, tp_group, params_dtype=torch.float32, tp_rank: int = 0) -> LinearSpec:
    """Column/row-parallel linears over ``tp_group`` (megatron-core ``ColumnParallelLinear``/``RowParallelLinear``);
    ``tp_rank``: this rank's index in the group (which heads' ALiBi slopes it takes)."""
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
            mark_tensor_parallel(self.weight, 0)
            if bias:
                mark_tensor_parallel(self.bias, 0)

        def forward(self, x):
            return super().forward(x)[0]

    class Row(RowParallelLinear):
        def __init__(self, i, o, bias):
            super().__init__(i, o, config=config, init_method=no_init, bias=bias,
                             input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)
            mark_tensor_parallel(self.weight, 1)

        def forward(self, x):
            return super().forward(x)[0]

    return LinearSpec(column=Column, row=Row, tp_size=tp_size, tp_rank=tp_rank,
                      replicated=replicated_linear(tp_group))


def te_linear_spec(tp_size: int, tp_group, tp_rank: int = 0) -> LinearSpec:
    """Transformer Engine ``Linear`` layers (``train.transformer_impl: transformer_engine``):
    plain at TP=1, column/row-parallel over ``tp_group`` otherwise (TE splits the weight the
    same way as megatron-core: column on the output dim, row on the input dim, bias of a row
    layer added after the reduction). Requires TE (a clear error otherwise)."""
    from kernels import te

    if tp_size == 1:
        return LinearSpec(column=lambda i, o, b: te.linear(i, o, b, use_te=True),
                          row=lambda i, o, b: te.linear(i, o, b, use_te=True), tp_size=1)

    def column(i, o, bias):
        layer = te.linear(i, o, bias, use_te=True, parallel_mode="column", tp_group=tp_group, tp_size=tp_size)
        mark_tensor_parallel(layer.weight, 0)
        if bias:
            mark_tensor_parallel(layer.bias, 0)
        return layer

    def row(i, o, bias):
        layer = te.linear(i, o, bias, use_te=True, parallel_mode="row", tp_group=tp_group, tp_size=tp_size)
        mark_tensor_parallel(layer.weight, 1)
        return layer

    return LinearSpec(column=column, row=row, tp_size=tp_size, tp_rank=tp_rank,
                      replicated=replicated_linear(tp_group))
