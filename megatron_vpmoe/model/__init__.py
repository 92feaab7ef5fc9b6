"""The VPMoE model: layers, layer spec, parameter accounting, generation."""
