"""The one place where megatron-core is adapted to CPU hosts (active only without a GPU).

megatron-core 0.16.1's tensor-parallel modules call ``torch.cuda.current_device()`` to place
tensors (the linears' weights, the sequence-parallel gathers and scatters). On a host without
CUDA that raises; :func:`enable` gives those modules (:data:`ADAPTED`, and nothing else: the rest
of the process keeps the real ``torch.cuda``) a view of ``torch`` whose ``cuda.current_device()``
is the CPU, and says so once in the log. Nothing is changed when a GPU is present, and installed
packages are never edited.
"""

from __future__ import annotations

import importlib
import logging

import torch

# megatron-core's modules that place tensors with torch.cuda.current_device() on our paths
ADAPTED = (
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.utils",  # the global memory buffer of the sequence-parallel gathers
)
_log = logging.getLogger(__name__)
_logged = False


class _CudaOnCpu:
    """``torch.cuda`` as the adapted modules see it: ``current_device()`` is the CPU."""

    @staticmethod
    def current_device() -> str:
        return "cpu"

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    """``torch`` as the adapted modules see it: everything is torch's own except ``cuda``."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name: str):
        return getattr(torch, name)


_TORCH_ON_CPU = _TorchOnCpu()


def enable() -> bool:
    """Adapt :data:`ADAPTED` if no GPU is present (logged once per process); returns whether active."""
    global _logged
    if torch.cuda.is_available():
        return False
    for name in ADAPTED:
        module = importlib.import_module(name)
        if module.__dict__.get("torch") is torch:
            module.torch = _TORCH_ON_CPU
    if not _logged:
        _logged = True
        _log.info("no GPU: megatron-core's tensor-parallel modules place tensors on the CPU "
                  "(torch.cuda.current_device() -> 'cpu' in %s)", ", ".join(ADAPTED))
    return True


def disable() -> None:
    """Give the adapted modules the real ``torch`` back."""
    for name in ADAPTED:
        module = importlib.import_module(name)
        if module.__dict__.get("torch") is _TORCH_ON_CPU:
            module.torch = torch
