"""Tensor-parallel linear layers for the model's :class:`LinearSpec` (megatron-core, or TE on GPU).

The wrappers return only the output (bias added inside) and keep the parameter names
``weight``/``bias``, so state-dict keys match the single-process model. Shards are tagged
with ``tensor_model_parallel``/``partition_dim`` for sharding and gathering full state dicts.
"""

from __future__ import annotations

import torch

from megatron_vpmoe.model.layers import LinearSpec, mark_tensor_parallel


def _transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def tensor_parallel_spec(tp_size: int, tp_group, params_dtype=torch.float32) -> LinearSpec:
    """Column/row-parallel linears over ``tp_group`` (megatron-core ``ColumnParallelLinear``/``RowParallelLinear``)."""
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

    # Transformer Engine on a GPU host would slot in here; it is not exercised on CPU.
    return LinearSpec(column=Column, row=Row, tp_size=tp_size)
