"""Pipeline parallelism with ``torch.distributed.pipelining``: 1F1B, or interleaved 1F1B with model chunks.

Layers are split into ``pp x vpp`` contiguous, balanced blocks (pipeline *stages*); rank ``r``
holds stages ``r, r + pp, r + 2 pp, ...`` (one with ``vpp = 1``). State-dict keys keep global
layer numbers. Every stage passes ``(hidden, v_first)`` on: value residual needs layer 0's
values on later stages, so they travel with the activations (a one-element placeholder when
value residual is off). The last stage's output goes to the schedule's loss function, which
applies the final norm and the head. Positions are the default ``0..S-1``.

Stages are built once per micro-batch shape with *static* shapes and dtypes (no shape-
inference pass through the pipeline), and one schedule per (shape, micro-batch count) is kept
for the run: ``Schedule1F1B`` (``ScheduleInterleaved1F1B`` with chunks), so at most about
``pp`` micro-batches' activations are alive on a stage, however many micro-batches a step has.
With fewer micro-batches than stages 1F1B is not defined and ``ScheduleGPipe`` runs instead
(its in-flight activations are then at most the micro-batch count, below ``pp``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from megatron_vpmoe.config.schema import ModelConfig
from megatron_vpmoe.model.moe import _ContiguousGrad
from megatron_vpmoe.model.values import first_values_shape
from megatron_vpmoe.parallel.layout import rank_stages, stage_layers


class PipelineStageModule(nn.Module):
    """One stage (model chunk) of a rank's ``VpmoeModel`` as the pipelining API wants it:
    tensors in, tensors out. Registers only its own layers (and the embedding on stage 0)."""

    def __init__(self, model, layer_numbers: List[int], first: bool, last: bool, dtype: torch.dtype, seq: int):
        super().__init__()
        self.seq = seq  # the micro-batches' sequence length (hidden may carry a slice of it)
        object.__setattr__(self, "_model", model)  # not a submodule: stages share the model
        self.layer_numbers = list(layer_numbers)
        self.chunk = nn.ModuleList([model.layers[str(i)] for i in layer_numbers])
        if first:
            self.embedding = model.embedding
        self.first, self.last, self.dtype = first, last, dtype

    def forward(self, first, v_first=None):
        m = self._model
        regions = m.regions(self.seq)
        if self.first:
            ids = first
            hidden = m.embed(ids, regions)
            positions = m.default_positions(ids)
        else:
            # gradients sent back to the previous stage must be dense (p2p buffers), whatever
            # strides the layers' backward produced
            hidden = _ContiguousGrad.apply(first)
            v_first = _ContiguousGrad.apply(v_first) if m.cfg.value_residual else None
            b = hidden.shape[0]
            positions = torch.arange(self.seq, device=hidden.device).unsqueeze(0).expand(b, self.seq)
        hidden, v_first = m.run_layers(hidden, positions, v_first, layer_numbers=self.layer_numbers,
                                       regions=regions)
        if self.last:
            return hidden
        if v_first is None:
            v_first = hidden.new_zeros(1)
        # p2p buffers must be dense and of the dtype the receiving stage was built with
        return hidden.to(self.dtype).contiguous(), v_first.to(self.dtype).contiguous()


def _metas(cfg: ModelConfig, tp: int, batch: int, seq: int, dtype: torch.dtype,
           hidden_seq: int) -> Tuple[torch.Tensor, ...]:
    """Meta tensors of what travels between stages: ``(hidden, v_first)``; ``hidden_seq`` is the
    residual stream's length on this rank (a slice of ``seq`` under sequence parallelism)."""
    # requires_grad marks what sends a gradient back (static mode derives grad buffers from it)
    hidden = torch.empty(batch, hidden_seq, cfg.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    if cfg.value_residual:
        v_first = torch.empty(batch, seq, *first_values_shape(cfg, tp), dtype=dtype,
                              device="meta", requires_grad=True)
    else:
        v_first = torch.empty(1, dtype=dtype, device="meta")
    return hidden, v_first


class PipelineRunner:
    """A rank's pipeline stages and schedules, built once and reused for every step."""

    def __init__(self, model, ctx, device: torch.device):
        self.model, self.ctx, self.device = model, ctx, device
        self.dtype = torch.float32  # activation dtype between stages (set_dtype)
        self._stages: Dict[tuple, list] = {}
        self._schedules: Dict[tuple, object] = {}
        self._loss = None  # the current step's loss function (the schedules call through it)

    def set_dtype(self, dtype: torch.dtype) -> None:
        if dtype != self.dtype:
            self.dtype = dtype
            self._stages.clear()
            self._schedules.clear()

    def _build_stages(self, batch: int, seq: int) -> list:
        from torch.distributed.pipelining import PipelineStage

        m, ctx = self.model, self.ctx
        cfg, n_stages = m.cfg, ctx.pp * ctx.vpp
        stages = []
        for s in rank_stages(ctx.pp, ctx.vpp, ctx.pp_rank):
            first, last = s == 0, s == n_stages - 1
            module = PipelineStageModule(m, stage_layers(cfg.num_layers, n_stages, s), first, last,
                                         self.dtype, seq)
            carried = _metas(cfg, ctx.tp, batch, seq, self.dtype, seq // m.regions(seq).size)
            inputs = (torch.empty(batch, seq, dtype=torch.long, device="meta"),) if first else carried
            outputs = (carried[0],) if last else carried
            stages.append(PipelineStage(module, s, n_stages, self.device, input_args=inputs,
                                        output_args=outputs, group=ctx.pp_group))
        return stages

    def schedule(self, batch: int, seq: int, n_micro: int):
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

        key = (batch, seq)
        if key not in self._stages:
            self._stages[key] = self._build_stages(batch, seq)
        skey = (batch, seq, n_micro)
        if skey not in self._schedules:
            stages = self._stages[key]
            loss = self._call_loss
            if self.ctx.vpp > 1:
                sched = ScheduleInterleaved1F1B(stages, n_micro, loss_fn=loss, scale_grads=False)
            elif n_micro >= self.ctx.pp:
                sched = Schedule1F1B(stages[0], n_micro, loss_fn=loss, scale_grads=False)
            else:
                sched = ScheduleGPipe(stages[0], n_micro, loss_fn=loss, scale_grads=False)
            self._schedules[skey] = sched
        return self._schedules[skey]

    def _call_loss(self, output, target):
        return self._loss(output, target)

    @property
    def holds_first(self) -> bool:
        return self.ctx.pp_rank == 0

    @property
    def holds_last(self) -> bool:
        return self.ctx.pp_rank == self.ctx.pp - 1

    def run(self, micro_batches: List[Dict], stage_loss, backward: bool) -> None:
        """Run one schedule step over ``micro_batches``; ``stage_loss(hidden, index)`` on the last stage."""
        batch, seq = micro_batches[0]["input_ids"].shape
        for mb in micro_batches:
            if tuple(mb["input_ids"].shape) != (batch, seq):
                raise ValueError("pipeline micro-batches must share one shape "
                                 f"({batch}x{seq}); got {tuple(mb['input_ids'].shape)}")
        sched = self.schedule(batch, seq, len(micro_batches))
        self._loss = stage_loss
        run = sched.step if backward else sched.eval
        args: Tuple = ()
        kwargs: Dict = {}
        if self.holds_first:
            args = (torch.cat([mb["input_ids"] for mb in micro_batches]).to(self.device),)
        if self.holds_last:
            # on the host: the loss reads the micro-batch number without a device sync
            index = torch.arange(len(micro_batches)).repeat_interleave(batch).view(-1, 1)
            kwargs = {"target": index, "losses": []}
        try:
            run(*args, **kwargs)
        finally:
            self._loss = None
