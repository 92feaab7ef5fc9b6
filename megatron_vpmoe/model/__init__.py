"""The VPMoE model: layers, MoE, the model module, parameter accounting, generation."""

from megatron_vpmoe.model.vpmoe import VpmoeModel  # noqa: F401
