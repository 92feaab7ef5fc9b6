"""A VPMoE shard under a TP/EP/DP layout, with one training-step entry point for the trainer.

``build_parallel_model`` builds the full model once under the seed (so every layout starts
from the same weights as the single-process model), then keeps this rank's shard: column/
row splits of TP linears and sinks, a slice of the routed experts for EP. Gradients are
all-reduced (summed) over the data-parallel group for dense parameters and over the
expert-data-parallel group for routed experts; TP-replicated parameters see identical
inputs on every TP rank and need no reduction (no sequence parallel), except those applied
to a rank's own heads (``tensor_parallel_partial_grad``), summed over the TP group.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_vpmoe.config.schema import ModelConfig
from megatron_vpmoe.model.vpmoe import VpmoeModel
from megatron_vpmoe.parallel.state import ParallelContext
from megatron_vpmoe.utils.errors import ConfigError


def _split(full: torch.Tensor, param, ctx: ParallelContext, num_experts: int) -> torch.Tensor:
    if getattr(param, "expert_parallel", False) and ctx.ep > 1:
        local = num_experts // ctx.ep
        return full.narrow(0, ctx.ep_rank * local, local)
    if getattr(param, "tensor_model_parallel", False) and ctx.tp > 1:
        dim = param.partition_dim
        size = full.shape[dim] // ctx.tp
        return full.narrow(dim, ctx.tp_rank * size, size)
    return full


def _all_reduce_coalesced(tensors: List[torch.Tensor], group) -> None:
    if not tensors or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def default_loss_fn(per_token_loss: torch.Tensor, batch: Dict) -> Tuple[torch.Tensor, int]:
    """Sum of token losses and the number of counted tokens (labels != -100)."""
    return per_token_loss.sum(), int((batch["labels"] != -100).sum())


class ParallelModel:
    """This rank's shard plus the layout's gradient reduction and state-dict resharding."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, module: VpmoeModel):
        self.cfg, self.ctx, self.module = cfg, ctx, module
        self._stage = None

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    # -- one training step's forward and backward --------------------------------------------
    def forward_backward(self, micro_batches: List[Dict], loss_fn: Optional[Callable] = None):
        """Forward+backward over this rank's micro-batches; gradients are those of
        ``sum(token losses of the global batch) / global token count`` (+ aux loss averaged
        over micro-batches and DP ranks), already reduced. Returns ``(loss_sum, n_tokens)``
        over the global batch (floats)."""
        loss_fn = loss_fn or default_loss_fn
        ctx = self.ctx
        local_tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
        total = torch.tensor([float(local_tokens)])
        if ctx.dp > 1:
            dist.all_reduce(total, group=ctx.dp_group)
        n_tokens = max(float(total), 1.0)
        if ctx.pp > 1:
            loss_sum = self._pipeline_forward_backward(micro_batches, n_tokens)
            self.reduce_gradients()
            result = torch.tensor([loss_sum])
            dist.all_reduce(result, group=ctx.pp_group)  # only the last stage has losses
            if ctx.dp > 1:
                dist.all_reduce(result, group=ctx.dp_group)
            return float(result), n_tokens
        loss_sum = 0.0
        aux_scale = 1.0 / (len(micro_batches) * ctx.dp)
        for mb in micro_batches:
            per_token = self.module(mb["input_ids"], mb.get("position_ids"), labels=mb["labels"])
            summed, _ = loss_fn(per_token, mb)
            loss = summed / n_tokens + self.module.aux_loss() * aux_scale
            loss.backward()
            loss_sum += float(summed.detach())
        self.reduce_gradients()
        result = torch.tensor([loss_sum])
        if ctx.dp > 1:
            dist.all_reduce(result, group=ctx.dp_group)
        return float(result), n_tokens

    def _pipeline_forward_backward(self, micro_batches: List[Dict], n_tokens: float) -> float:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        from megatron_vpmoe.parallel.pipeline import PipelineStageModule

        m, ctx = self.module, self.ctx
        if self._stage is None:
            self._stage_module = PipelineStageModule(m)
            self._stage = PipelineStage(self._stage_module, ctx.pp_rank, ctx.pp,
                                        torch.device("cpu") if not torch.cuda.is_available()
                                        else torch.device("cuda", torch.cuda.current_device()),
                                        group=ctx.pp_group)

        def loss_fn(hidden, labels):
            return m.head(hidden, labels).sum() / n_tokens

        schedule = ScheduleGPipe(self._stage, len(micro_batches), loss_fn=loss_fn, scale_grads=False)
        ids = torch.cat([mb["input_ids"] for mb in micro_batches])
        labels = torch.cat([mb["labels"] for mb in micro_batches])
        losses: List[torch.Tensor] = []
        if m.pre_process:
            schedule.step(ids)
        elif m.post_process:
            schedule.step(target=labels, losses=losses)
        else:
            schedule.step()
        return float(sum(float(x) for x in losses)) * n_tokens

    def reduce_gradients(self) -> None:
        dense, experts, partial = [], [], []
        for p in self.module.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            (experts if getattr(p, "expert_parallel", False) else dense).append(p.grad)
            if getattr(p, "tensor_parallel_partial_grad", False):
                partial.append(p.grad)
        if self.ctx.tp > 1:
            _all_reduce_coalesced(partial, self.ctx.tp_group)
        if self.ctx.dp > 1:
            _all_reduce_coalesced(dense, self.ctx.dp_group)
        _all_reduce_coalesced(experts, self.ctx.expert_dp_group)

    # -- expert balancing -------------------------------------------------------------------
    def expert_load(self) -> torch.Tensor:
        load = self.module.expert_load()
        if self.ctx.dp > 1 and load.numel():
            dist.all_reduce(load, group=self.ctx.dp_group)
        return load

    def update_expert_bias(self) -> None:
        self.module.update_expert_bias(self.expert_load())

    # -- state dicts in single-process keys and shapes (reshard across layouts) ---------------
    @torch.no_grad()
    def load_full_state_dict(self, full: Dict[str, torch.Tensor]) -> None:
        params = dict(self.module.named_parameters())
        local = {}
        for key, value in self.module.state_dict().items():
            if key.endswith("_extra_state"):  # megatron-core layers' (empty) extra state
                local[key] = value
                continue
            if key not in full:
                raise ConfigError(f"checkpoint has no {key!r}", key="state_dict")
            local[key] = _split(full[key], params.get(key), self.ctx, self.cfg.num_moe_experts)
        self.module.load_state_dict(local)

    @torch.no_grad()
    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters())
        out = {}
        for key, value in self.module.state_dict().items():
            p = params.get(key)
            if key.endswith("_extra_state"):
                continue
            if getattr(p, "expert_parallel", False) and self.ctx.ep > 1:
                out[key] = _gather(value, 0, self.ctx.ep, self.ctx.ep_group)
            elif getattr(p, "tensor_model_parallel", False) and self.ctx.tp > 1:
                out[key] = _gather(value, p.partition_dim, self.ctx.tp, self.ctx.tp_group)
            else:
                out[key] = value.clone()
        return out


def _gather(t: torch.Tensor, dim: int, size: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def build_parallel_model(cfg: ModelConfig, ctx: ParallelContext, seed: int = 1234) -> ParallelModel:
    """This rank's shard, initialised exactly as ``VpmoeModel(cfg)`` under ``torch.manual_seed(seed)``."""
    ctx.config.validate(cfg)
    from megatron_vpmoe.parallel.expert import AllToAllDispatcher
    from megatron_vpmoe.parallel.pipeline import check_pipeline_config, stage_layers
    from megatron_vpmoe.parallel.tensor import tensor_parallel_spec

    torch.manual_seed(seed)
    full = VpmoeModel(cfg).state_dict()
    spec = tensor_parallel_spec(ctx.tp, ctx.tp_group) if ctx.tp > 1 else None
    dispatcher = AllToAllDispatcher(ctx.ep, ctx.ep_group) if ctx.ep > 1 else None
    local_experts = cfg.num_moe_experts // ctx.ep if cfg.num_moe_experts else None
    layers, first, last = None, True, True
    if ctx.pp > 1:
        check_pipeline_config(cfg)
        layers = stage_layers(cfg.num_layers, ctx.pp, ctx.pp_rank)
        first, last = ctx.pp_rank == 0, ctx.pp_rank == ctx.pp - 1
    module = VpmoeModel(cfg, spec, layer_numbers=layers, pre_process=first, post_process=last,
                        num_local_experts=local_experts, dispatcher=dispatcher)
    pm = ParallelModel(cfg, ctx, module)
    pm.load_full_state_dict(full)
    return pm
