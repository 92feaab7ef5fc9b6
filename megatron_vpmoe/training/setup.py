"""One training setup for every trainer: distributed init, layout, this rank's shard, optimizer, ZeRO, checkpoints.

``Trainer`` (pretraining, phase-1 distillation) and the on-policy trainer (``distill/onpolicy.py``),
and through them the experiment runners, start the same way: :func:`init_layout` joins the
process group and makes the TP/EP/PP/DP groups; :func:`build_training` builds this rank's shard on
its device, its optimizer (wrapped by ZeRO-2 under ``parallel.distributed_optimizer``) and the
checkpoint manager. What differs (the data, the loss, a frozen reference model) stays in each trainer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Union

import torch
import torch.distributed as dist

from megatron_vpmoe.config.startup import check_world_layout
from megatron_vpmoe.parallel import ParallelContext, ParallelModel, build_parallel_model, init_parallel
from megatron_vpmoe.parallel.collectives import engine_device
from megatron_vpmoe.parallel.zero import DistributedOptimizer
from megatron_vpmoe.training.checkpoint import CheckpointManager
from megatron_vpmoe.training.distributed import RankInfo, init_distributed
from megatron_vpmoe.training.optimizer import build_optimizer
from megatron_vpmoe.utils.errors import ConfigError, VpmoeError
from megatron_vpmoe.utils.notices import filter_cpu_warnings


@dataclass
class Layout:
    """This process's place: its rank in the world, its layout's groups and its device."""

    info: RankInfo
    ctx: ParallelContext
    device: torch.device

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` in place over the data-parallel replicas (TP/PP peers hold the same batch)."""
        if self.ctx.dp > 1:
            dist.all_reduce(t, group=self.ctx.dp_group)
        return t


class Precision:
    """The compute precision of a run's forward passes: bf16 autocast (``train.precision``) and the
    FP8 recipe of Transformer Engine's linears (``train.fp8``)."""

    def __init__(self, train_cfg, device: torch.device):
        p = train_cfg.precision
        use_bf16 = p == "bf16" or (p == "auto" and torch.cuda.is_available())
        self.device = device
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.fp8_recipe = None
        if train_cfg.fp8:  # implies transformer_engine, whose availability build_training checks
            from megatron_vpmoe.kernels import te

            self.fp8_recipe = te.fp8_recipe(train_cfg.fp8)

    def autocast(self) -> contextlib.ExitStack:
        """The context a forward runs in."""
        stack = contextlib.ExitStack()
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
        if self.fp8_recipe is not None:  # TE linears compute in FP8 under the recipe
            from megatron_vpmoe.kernels import te

            stack.enter_context(te.fp8_autocast(True, self.fp8_recipe))
        return stack


@dataclass
class TrainingState:
    """What a trainer steps and saves: the shard, its optimizer (ZeRO or torch's) and the checkpoints."""

    pm: ParallelModel
    optimizer: Union[torch.optim.Optimizer, DistributedOptimizer]
    checkpoints: CheckpointManager


def init_layout(cfg, on_joined: Optional[Callable[[RankInfo], None]] = None) -> Layout:
    """Join the process group (torchrun / SLURM / MPI environment) and make ``cfg.parallel``'s groups;
    a layout that does not fit the model or the world size is one ConfigError naming the key.
    ``on_joined(info)`` runs once the rank is known, before the groups are made."""
    info = init_distributed()
    if on_joined is not None:
        on_joined(info)
    check_world_layout(cfg, info.world_size, batch=False)  # e.g. tensor=2 in one process: one line; the
    # trainer checks its batch layout next, the on-policy trainer's batches are prompt groups
    device = engine_device()
    if device.type == "cpu":
        filter_cpu_warnings()  # megatron-core's CUDA-only advice
    return Layout(info, init_parallel(cfg.parallel), device)


def build_training(cfg, layout: Layout, *, transformer_impl: str = "local",
                   model_factory: Optional[Callable] = None, async_save: bool = False,
                   construction: Callable[[], ContextManager] = contextlib.nullcontext,
                   bf16_master: bool = False) -> TrainingState:
    """This rank's shard of ``cfg.model`` (seeded by ``run.seed``) on the layout's device, AdamW
    over it (ZeRO-2 when ``parallel.distributed_optimizer``) and a checkpoint manager for
    ``checkpoint.dir``. ``model_factory(model_cfg) -> nn.Module`` replaces the model (data parallel
    only); ``construction()``: a context around building the shard (a memory report's phase);
    ``bf16_master``: the shard computes with bf16 copies of its fp32 master weights, cast once per step
    (``parallel/mixed_precision.py``; under ZeRO after the optimizer's parameter all-gather)."""
    ctx = layout.ctx
    if transformer_impl == "transformer_engine":
        from megatron_vpmoe.kernels.te import te_status

        status = te_status()
        if not status.available:
            raise ConfigError(f"Transformer Engine is not usable here: {status.reason}",
                              key="train.transformer_impl")
    if model_factory is not None:  # any nn.Module with VpmoeModel's interface, DP only
        if ctx.tp * ctx.ep * ctx.pp > 1:
            raise VpmoeError("a custom model_factory runs data-parallel only")
        torch.manual_seed(cfg.run.seed)
        pm = ParallelModel(cfg.model, ctx, model_factory(cfg.model).to(layout.device))
    else:
        with construction():
            pm = build_parallel_model(cfg.model, ctx, seed=cfg.run.seed, transformer_impl=transformer_impl)
        pm.module.to(layout.device)
    pm.set_recompute(cfg.train.recompute)
    optimizer = build_optimizer(pm.module, cfg.train.optimizer)
    if cfg.parallel.distributed_optimizer:  # ZeRO-2: AdamW state and gradients sharded over DP ranks
        optimizer = DistributedOptimizer(optimizer, pm)  # gradients reduce-scattered
    if bf16_master:
        from megatron_vpmoe.parallel.mixed_precision import Bf16Weights

        wait = optimizer.wait_for_parameters if isinstance(optimizer, DistributedOptimizer) else None
        pm.bf16_weights = Bf16Weights(pm.module, before=wait)
    checkpoints = CheckpointManager(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last, async_save=async_save)
    return TrainingState(pm, optimizer, checkpoints)
