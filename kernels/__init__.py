"""Fused kernels for VPMoE (Triton) with PyTorch references; the model calls ``kernels.ops``."""
