"""Fused kernels for VPMoE (Triton) with PyTorch references; the model calls ``megatron_vpmoe.kernels.ops``.

The sources live in the checkout's top-level ``kernels/`` folder, which has no ``__init__.py`` on purpose:
a Python started in the checkout root must import Hugging Face's ``kernels`` (a transformers
dependency), never ours. This package links each source file (``ops.py -> ../../kernels/ops.py``);
a new kernel file gets its link here too (tests/test_kernels_layout.py checks both folders agree).
"""
