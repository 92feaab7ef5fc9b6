"""megatron_vpmoe: a Megatron-style pretraining and distillation stack for the VPMoE model."""

__version__ = "0.1.0"
