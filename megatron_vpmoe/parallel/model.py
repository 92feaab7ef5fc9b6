"""A VPMoE shard under a TP/EP/PP/DP layout, with one training-step entry point for the trainer.

``build_parallel_model`` allocates only this rank's shard (its stage's layers, column/row
splits of TP linears and sinks, a slice of the routed experts for EP) and initialises each
parameter from its own generator, so every layout starts from the single-process weights.
Gradients are summed over the data-parallel group for dense parameters and over the
expert-data-parallel group for routed experts (in buckets during backward,
``parallel/grad_sync.py``, or after it; reduce-scattered to the distributed optimizer's split
under :meth:`ParallelModel.shard_gradients`); TP-replicated parameters see identical
inputs on every TP rank and need no reduction (no sequence parallel), except those applied
to a rank's own heads (placement ``PARTIAL_GRAD``), summed over the TP group. Which is which is
each parameter's :class:`~megatron_vpmoe.parallel.placement.Placement`, decided once at build.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_vpmoe.config.schema import ModelConfig
from megatron_vpmoe.model.init import draw_base_seed
from megatron_vpmoe.model.vpmoe import VpmoeModel, activation_dtype
from megatron_vpmoe.parallel.collectives import engine_device
from megatron_vpmoe.parallel.gradients import ShardGradients
from megatron_vpmoe.parallel.placement import Placements
from megatron_vpmoe.parallel.state import ParallelContext


# loss_fn(per_token_loss [b, S], micro_batch) -> (loss to backpropagate, 1-D float64 stats)
LossFn = Callable[[torch.Tensor, Dict], Tuple[torch.Tensor, torch.Tensor]]


class ParallelModel:
    """This rank's shard plus the layout's gradient reduction and state-dict resharding."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, module: VpmoeModel,
                 placements: Optional[Placements] = None):
        self.cfg, self.ctx, self.module = cfg, ctx, module
        # every parameter's placement over the layout, decided once (from the model's declarations)
        self.placements = placements if placements is not None else Placements(module, ctx)
        self._pipeline = None  # the pipeline runner (PP > 1), built at the first step
        # the gradients after backward: bucketed sync, the layout's reductions, the global norm
        self.gradients = ShardGradients(module, ctx, self.placements)
        self.bf16_weights = None  # parallel.mixed_precision.Bf16Weights: bf16 weights over fp32 master

    def set_recompute(self, mode: str) -> None:
        """Activation recompute (``train.recompute``) for this rank's layers."""
        self.module.set_recompute(mode)

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    # -- one training step's forward and backward --------------------------------------------
    def forward_backward(self, micro_batches: List[Dict], loss_fn: LossFn):
        """Forward+backward over this rank's micro-batches, gradients reduced over the layout.

        ``loss_fn(per_token_loss [b, S], micro_batch) -> (loss, stats)``: ``loss`` is the
        micro-batch's share of the caller's objective (backpropagated as is; the trainer's
        role-aware objective, the on-policy update's policy loss) and ``stats`` a 1-D float64
        tensor; returns the stats summed over micro-batches, pipeline stages and data-parallel
        ranks (the same on every rank). Works in every layout; under PP it runs on the last
        stage, once per micro-batch in order.

        The MoE aux loss (``moe_aux_loss_coeff > 0``) is added in every layout by the MoE layers
        themselves, averaged over micro-batches and DP ranks, through backward (so it reaches
        every pipeline stage); :meth:`aux_loss_added` reads what was added."""
        return self._run(micro_batches, loss_fn, backward=True)

    @torch.no_grad()
    def forward_only(self, micro_batches: List[Dict], loss_fn: LossFn) -> torch.Tensor:
        """Like ``forward_backward(micro_batches, loss_fn)`` without gradients (validation)."""
        return self._run(micro_batches, loss_fn, backward=False)

    def _run(self, micro_batches: List[Dict], loss_fn: LossFn, backward: bool) -> torch.Tensor:
        ctx = self.ctx
        # each MoE layer adds its aux loss, averaged over micro-batches and DP ranks, in backward
        self.module.set_aux_loss_scale(1.0 / (len(micro_batches) * ctx.dp) if backward else 0.0)
        sync = self.gradients.overlapped_sync() if backward else None  # built while the weights are fp32
        if sync is not None:
            sync.start(len(micro_batches))
        if self.bf16_weights is not None:  # bf16 working weights for this forward/backward
            self.bf16_weights.begin(sync.params if sync is not None else ())
        try:
            if ctx.pp > 1:
                stats = self._pipeline_run(micro_batches, loss_fn, backward)
            else:
                stats = None
                for mb in micro_batches:
                    per_token = self.module(mb["input_ids"], mb.get("position_ids"), labels=mb["labels"])
                    loss, part = loss_fn(per_token, mb)
                    if backward:
                        self._backward(loss)
                    stats = part.detach().double().clone() if stats is None else stats + part.detach().double()
                if stats is None:
                    stats = torch.zeros(0, dtype=torch.float64)
        finally:
            if self.bf16_weights is not None:  # fp32 master weights and gradients again
                self.bf16_weights.end()
        if backward:
            if sync is not None:
                sync.finish()
            self.gradients.reduce(data_parallel=sync is None)
        stats = stats.to(engine_device())
        if ctx.dp > 1:
            dist.all_reduce(stats, group=ctx.dp_group)
        return stats

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; with bf16 weights outside autocast, so each op's backward runs in
        its forward's dtypes (the fp32 router's gradients stay fp32, its weight is not cast to bf16)."""
        if self.bf16_weights is None:
            loss.backward()
            return
        with torch.autocast(loss.device.type, enabled=False):
            loss.backward()

    def _pipeline_run(self, micro_batches: List[Dict], loss_fn: LossFn, backward: bool) -> torch.Tensor:
        from megatron_vpmoe.parallel.pipeline import PipelineRunner

        m, ctx = self.module, self.ctx
        if self._pipeline is None:  # stages and schedules are built once and reused
            self._pipeline = PipelineRunner(m, ctx, engine_device())
        # what travels between stages: the residual stream's dtype (bf16 under bf16 autocast)
        self._pipeline.set_dtype(activation_dtype(torch.empty(0, device=engine_device())))
        parts: Dict[int, torch.Tensor] = {}

        def stage_loss(hidden, index):
            # the target is each micro-batch's index, so the loss sees its labels and loss mask
            i = int(index.reshape(-1)[0])
            labels = micro_batches[i]["labels"]
            loss, part = loss_fn(m.head(hidden, labels, m.regions(labels.shape[1])), micro_batches[i])
            parts[i] = part.detach().double()
            return loss

        self._pipeline.run(micro_batches, stage_loss, backward)
        # only the last stage has losses: agree on the stats' length, then sum over the stages
        size = torch.tensor([parts[0].numel() if parts else 0], dtype=torch.long, device=engine_device())
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=ctx.pp_group)
        stats = (torch.stack([parts[i] for i in sorted(parts)]).sum(0) if parts else
                 torch.zeros(int(size), dtype=torch.float64)).to(engine_device())
        dist.all_reduce(stats, group=ctx.pp_group)
        return stats

    # -- the gradients this rank holds after the reduction (parallel/gradients.py) -------------
    def shard_gradients(self, shard_of) -> None:
        """Reduce-scatter data-parallel gradients to the distributed optimizer's split instead of
        all-reducing them (:meth:`ShardGradients.shard_to`)."""
        self.gradients.shard_to(shard_of)

    def held_gradients(self) -> List[Tuple[torch.Tensor, torch.Tensor, bool]]:
        """``(tensor, its parameter, split over the DP group)`` for every gradient this rank holds."""
        return self.gradients.held()

    def grad_tensors(self) -> List[torch.Tensor]:
        """The tensors whose ``.grad`` this rank holds (what gradient clipping scales)."""
        return self.gradients.tensors()

    def grad_norm(self) -> torch.Tensor:
        """L2 norm of the full model's gradient, the same on every rank (:meth:`ShardGradients.norm`)."""
        return self.gradients.norm()

    # -- expert balancing -------------------------------------------------------------------
    def aux_loss_added(self) -> torch.Tensor:
        """The MoE aux loss the last training step added to the objective, summed over pipeline
        stages and DP ranks (a device tensor; 0 when the aux loss is off)."""
        total = self.module.aux_loss_added().reshape(1).to(engine_device(), torch.float64)
        if self.ctx.pp > 1:
            dist.all_reduce(total, group=self.ctx.pp_group)
        if self.ctx.dp > 1:
            dist.all_reduce(total, group=self.ctx.dp_group)
        return total[0]

    def expert_load(self) -> torch.Tensor:
        load = self.module.expert_load()
        if self.ctx.dp > 1 and load.numel():
            dist.all_reduce(load, group=self.ctx.dp_group)
        return load

    def update_expert_bias(self, apply: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same bias update on every rank from the DP-reduced load (only where the bool
        tensor ``apply`` is true: a skipped step leaves the biases, without a host read); resets
        the routing counters; returns that load."""
        load = self.expert_load()
        self.module.update_expert_bias(load, apply)
        return load

    def reset_expert_counters(self) -> None:
        """Forget the routing counts since the last update (eval forwards, skipped steps)."""
        for name, buf in self.module.named_buffers():
            if name.endswith("tokens_per_expert"):
                buf.zero_()

    # -- state dicts in single-process keys and shapes (reshard across layouts) ---------------
    def is_placed(self, p: torch.Tensor) -> bool:
        """Whether parameter ``p`` is a slice of a TP/EP split (not the whole tensor)."""
        return self.placements[p].is_split

    def shard_spec(self, key: str) -> Optional[Tuple[int, Any]]:
        """How this rank's parameter ``key`` (and optimizer state of its shape) is split:
        ``(dim, group)`` when it is one of ``group``'s equal slices along ``dim`` (routed experts
        over the EP group along dim 0, TP-split weights over the TP group along their declared
        dim); None when this rank holds the whole tensor."""
        where = self.placements.of_name(key)
        return (where.dim, where.split_group) if where is not None and where.is_split else None

    def as_sharded(self, key: str, local: torch.Tensor) -> torch.Tensor:
        """``local`` (this rank's shard of parameter ``key``, or optimizer state of its shape)
        as a DTensor with the global shape, sharing ``local``'s storage (no copy, no
        communication); other tensors as they are."""
        spec = self.shard_spec(key)
        if spec is None or local.shape != self._params[key].shape:
            return local
        dim, group = spec
        shape = list(local.shape)
        shape[dim] *= dist.get_world_size(group)
        return sharded_dtensor(local, group, dim, shape)

    def sharded_state_dict(self) -> Dict[str, torch.Tensor]:
        """The module's state at single-process keys: sharded tensors as DTensors (:meth:`as_sharded`)."""
        return {key: self.as_sharded(key, value) for key, value in self.module.state_dict().items()
                if not key.endswith("_extra_state")}

    @functools.cached_property
    def _params(self) -> Dict[str, torch.Tensor]:
        return dict(self.module.named_parameters())



_MESHES: Dict[tuple, Any] = {}  # (process group, device type) -> its 1-D DeviceMesh


def sharded_dtensor(local: torch.Tensor, group, dim: int, global_shape) -> torch.Tensor:
    """``local`` as this rank's ``Shard(dim)`` of a DTensor of ``global_shape`` over ``group``
    (``torch.chunk`` sizes), sharing its storage: no copy, no communication."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    key = (group, local.device.type)
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh.from_group(group, local.device.type)
    shape = list(global_shape)
    return DTensor.from_local(local, _MESHES[key], [Shard(dim)], run_check=False,
                              shape=torch.Size(shape), stride=_contiguous_stride(shape))


def _contiguous_stride(shape: List[int]) -> Tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


def _shard_of(placements: Placements):
    """Which slice of its single-process parameter each local tensor is (see ``model/init.py``)."""
    from megatron_vpmoe.model.init import ShardSlice

    def shard_of(name: str, p: torch.Tensor):
        where = placements[p]
        if not where.is_split:
            return None
        if where.is_expert:  # [local experts, ...]: a block of global experts
            return ShardSlice(expert_offset=where.rank * p.shape[0])
        return ShardSlice(split_dim=where.dim, split_rank=where.rank, split_size=where.size)

    return shard_of


def build_parallel_model(cfg: ModelConfig, ctx: ParallelContext, seed: int = 1234,
                         transformer_impl: str = "local") -> ParallelModel:
    """This rank's shard, initialised exactly as ``VpmoeModel(cfg)`` under ``torch.manual_seed(seed)``;
    ``transformer_impl="transformer_engine"``: its linears are Transformer Engine's.

    Only this rank's parameters are ever allocated: its pipeline stage's layers (its chunks
    under a virtual pipeline), its TP slices, its EP experts. Each is initialised in place from
    the parameter's own generator (``model/init.py``), so no rank holds the full model."""
    ctx.config.validate(cfg)
    from megatron_vpmoe.parallel.expert import AllToAllDispatcher
    from megatron_vpmoe.parallel.layout import rank_layers
    from megatron_vpmoe.parallel.tensor import te_linear_spec, tensor_parallel_spec

    torch.manual_seed(seed)
    base_seed = draw_base_seed()
    if transformer_impl == "transformer_engine":
        spec = te_linear_spec(ctx.tp, ctx.tp_group, tp_rank=ctx.tp_rank)
    else:
        spec = tensor_parallel_spec(ctx.tp, ctx.tp_group, sequence_parallel=ctx.config.sequence_parallel,
                                    tp_rank=ctx.tp_rank) if ctx.tp > 1 else None
    dispatcher = AllToAllDispatcher(ctx.ep, ctx.ep_group) if ctx.ep > 1 else None
    local_experts = cfg.num_moe_experts // ctx.ep if cfg.num_moe_experts else None
    layers, first, last = None, True, True
    if ctx.pp > 1:
        layers = rank_layers(cfg.num_layers, ctx.pp, ctx.vpp, ctx.pp_rank)
        first, last = ctx.pp_rank == 0, ctx.pp_rank == ctx.pp - 1
    module = VpmoeModel(cfg, spec, layer_numbers=layers, pre_process=first, post_process=last,
                        num_local_experts=local_experts, dispatcher=dispatcher, initialize=False)
    placements = Placements(module, ctx)
    module.reset_parameters(base_seed, _shard_of(placements))
    return ParallelModel(cfg, ctx, module, placements)
