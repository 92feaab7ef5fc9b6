"""Pipeline parallelism with ``torch.distributed.pipelining`` (GPipe schedule).

Layers are split into contiguous blocks, one per pipeline rank (state-dict keys keep global
layer numbers). Every stage passes ``(hidden, v_first)`` on: value residual needs layer 0's
values on later stages, so they are carried with the activations (a zero placeholder when
value residual is off). The last stage's output goes to a loss function that applies the
final norm and ``kernels.ops.linear_cross_entropy``. Positions are the default ``0..S-1``.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from megatron_vpmoe.config.schema import ModelConfig
from megatron_vpmoe.model.moe import _ContiguousGrad


def stage_layers(num_layers: int, pp: int, rank: int) -> List[int]:
    """Contiguous, balanced layer numbers of pipeline stage ``rank``."""
    per, extra = divmod(num_layers, pp)
    start = rank * per + min(rank, extra)
    return list(range(start, start + per + (1 if rank < extra else 0)))


class PipelineStageModule(nn.Module):
    """Adapts a stage's ``VpmoeModel`` to the pipelining API: tensors in, tensors out."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        # the schedule's shape inference runs one forward on placeholder tensors before the
        # micro-batches; it must not feed the routers' load counters (expert-bias balancing)
        self.shape_inference_pending = True

    def forward(self, first, v_first=None):
        if not self.shape_inference_pending:
            return self._forward(first, v_first)
        self.shape_inference_pending = False
        counters = [m.router.tokens_per_expert for m in self.model.moe_layers()]
        saved = [c.clone() for c in counters]
        try:
            return self._forward(first, v_first)
        finally:
            for c, value in zip(counters, saved):
                c.copy_(value)

    def _forward(self, first, v_first=None):
        m = self.model
        if m.pre_process:
            ids = first
            hidden = m.embed(ids)
            positions = m.default_positions(ids)
        else:
            # gradients sent back to the previous stage must be dense (p2p buffers), whatever
            # strides the layers' backward produced
            hidden = _ContiguousGrad.apply(first)
            if v_first is not None:
                v_first = _ContiguousGrad.apply(v_first)
            b, s = hidden.shape[:2]
            positions = torch.arange(s, device=hidden.device).unsqueeze(0).expand(b, s)
            if not m.cfg.value_residual:
                v_first = None
        hidden, v_first = m.run_layers(hidden, positions, v_first)
        if m.post_process:
            return hidden
        if v_first is None:
            v_first = hidden.new_zeros(1)
        return hidden.contiguous(), v_first.contiguous()  # p2p buffers must be dense


def check_pipeline_config(cfg: ModelConfig) -> None:
    from megatron_vpmoe.utils.errors import ConfigError
    if cfg.moe_aux_loss_coeff > 0:
        raise ConfigError("the MoE aux loss is not supported with pipeline parallelism yet; "
                          "use aux-loss-free balancing (moe_aux_loss_coeff: 0)",
                          key="model.moe_aux_loss_coeff")
