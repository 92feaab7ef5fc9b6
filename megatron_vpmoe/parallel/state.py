"""Process-group topology from megatron-core ``parallel_state``, bundled as one context object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from megatron_vpmoe.config.schema import ParallelConfig
from megatron_vpmoe.utils.errors import ConfigError


@dataclass
class ParallelContext:
    """Sizes, ranks and groups of this process (groups are torch.distributed groups)."""

    world_size: int
    rank: int
    tp: int
    ep: int
    pp: int
    dp: int
    tp_rank: int
    ep_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    ep_group: Any
    pp_group: Any
    dp_group: Any  # dense parameters' gradient all-reduce
    expert_dp_group: Any  # routed experts' gradient all-reduce
    config: ParallelConfig

    @property
    def vpp(self) -> int:
        """Model chunks per pipeline rank (interleaved schedule when > 1)."""
        return self.config.virtual_pipeline if self.pp > 1 else 1


def init_parallel(cfg: ParallelConfig) -> ParallelContext:
    """Create TP/EP/PP/DP groups (call after ``torch.distributed.init_process_group``).

    A single process without a process group gets the trivial layout (every size 1, no groups)."""
    if not dist.is_initialized():
        if cfg.tensor * cfg.expert * cfg.pipeline > 1 or cfg.data > 1:
            raise ConfigError("call torch.distributed.init_process_group before init_parallel",
                              key="parallel")
        return ParallelContext(world_size=1, rank=0, tp=1, ep=1, pp=1, dp=1, tp_rank=0, ep_rank=0,
                               pp_rank=0, dp_rank=0, tp_group=None, ep_group=None, pp_group=None,
                               dp_group=None, expert_dp_group=None, config=cfg)
    world = dist.get_world_size()
    dp = cfg.resolve_data(world)
    from megatron_vpmoe.parallel import cpu_compat
    cpu_compat.enable()
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor, pipeline_model_parallel_size=cfg.pipeline,
        expert_model_parallel_size=cfg.expert,
        create_gloo_process_groups=False)
    return ParallelContext(
        world_size=world, rank=dist.get_rank(), tp=cfg.tensor, ep=cfg.expert, pp=cfg.pipeline,
        dp=dp, tp_rank=ps.get_tensor_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(), ep_group=ps.get_expert_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(), dp_group=ps.get_data_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(), config=cfg)
