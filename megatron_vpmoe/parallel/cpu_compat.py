"""The one place where megatron-core is adapted to CPU hosts (active only without a GPU).

megatron-core 0.16.1's tensor-parallel linears call ``torch.cuda.current_device()`` to place
tensors. On a host without CUDA that raises; :func:`enable` points it at the CPU. Nothing
is patched when a GPU is present, and installed packages are never edited.
"""

from __future__ import annotations

import torch

_ORIGINAL_CURRENT_DEVICE = torch.cuda.current_device


def _cpu_current_device() -> str:
    return "cpu"


def enable() -> bool:
    """Apply the CPU adaptations if no GPU is present; returns whether they are active."""
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = _cpu_current_device  # adaptation 1: device placement
    return True


def disable() -> None:
    torch.cuda.current_device = _ORIGINAL_CURRENT_DEVICE
