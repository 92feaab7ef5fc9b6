"""Run configuration: the typed schema and its YAML loader."""

from megatron_vpmoe.config.loader import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    save_resolved_config,
)
from megatron_vpmoe.config.schema import (
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    LogConfig,
    ModelConfig,
    OnPolicyConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    ScheduleConfig,
    ScorerConfig,
    TrainConfig,
    VpmoeConfig,
)

__all__ = [
    "CheckpointConfig", "DataConfig", "DistillConfig", "LogConfig", "ModelConfig",
    "OnPolicyConfig", "OptimizerConfig", "ParallelConfig", "RunConfig", "ScheduleConfig",
    "ScorerConfig", "TrainConfig", "VpmoeConfig", "apply_overrides", "config_from_dict",
    "config_to_dict", "dump_config", "load_config", "save_resolved_config",
]
