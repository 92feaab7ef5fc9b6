"""Transformer Engine (TE) detection and layer factories, with plain-PyTorch fallbacks.

TE is optional and GPU-only. :func:`te_status` says whether it can be used here (a CUDA device,
``transformer_engine.pytorch`` importable, ``VPMOE_DISABLE_TE`` unset) and why not otherwise.
The factories return TE modules when it can and PyTorch modules with the same parameter names
otherwise, so they plug into the model's ``LinearSpec`` unchanged::

    from megatron_vpmoe.kernels import te
    from megatron_vpmoe.model import VpmoeModel
    from megatron_vpmoe.model.layers import LinearSpec
    model = VpmoeModel(cfg, spec=LinearSpec(column=te.linear, row=te.linear))
    with te.fp8_autocast(enabled=True, recipe=te.fp8_recipe("delayed")):
        loss = model(ids, labels=labels)

``use_te=None`` picks TE when available; ``use_te=True`` requires it (a clear error otherwise);
``use_te=False`` never uses it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_vpmoe.kernels import ops
from megatron_vpmoe.utils.errors import VpmoeError

FP8_RECIPES = ("delayed", "current", "mxfp8")


@dataclass(frozen=True)
class TEStatus:
    available: bool
    reason: str  # why not (empty when available)
    version: Optional[str] = None


def te_status() -> TEStatus:
    """Whether Transformer Engine can be used in this process, and why not."""
    if os.environ.get("VPMOE_DISABLE_TE"):
        return TEStatus(False, "disabled by VPMOE_DISABLE_TE")
    if not torch.cuda.is_available():
        return TEStatus(False, "no CUDA device (Transformer Engine is GPU-only)")
    try:
        importlib.import_module("transformer_engine.pytorch")
        version = getattr(importlib.import_module("transformer_engine"), "__version__", "unknown")
    except Exception as exc:  # ImportError, or a TE build that fails to load its CUDA libraries
        return TEStatus(False, f"transformer_engine.pytorch is not importable ({exc})")
    return TEStatus(True, "", version)


def _use(use_te: Optional[bool]) -> bool:
    if use_te is False:
        return False
    status = te_status()
    if use_te and not status.available:
        raise VpmoeError(f"Transformer Engine requested but unavailable: {status.reason}")
    return status.available


def _te_pytorch():
    return importlib.import_module("transformer_engine.pytorch")


def linear(in_features: int, out_features: int, bias: bool = True, *,
           use_te: Optional[bool] = None, **te_options) -> nn.Module:
    """``te.pytorch.Linear`` (FP8-capable) or ``nn.Linear``; parameters ``weight [out, in]`` and ``bias``.

    ``te_options`` go to TE's ``Linear`` (e.g. ``parallel_mode="column"``, ``tp_group``,
    ``tp_size`` for tensor parallelism); they need TE."""
    if _use(use_te):
        return _te_pytorch().Linear(in_features, out_features, bias=bias, **te_options)
    if te_options:
        raise VpmoeError(f"{', '.join(sorted(te_options))}: Transformer Engine options, but TE is not used")
    return nn.Linear(in_features, out_features, bias=bias)


class NormLinear(nn.Module):
    """PyTorch fallback of TE's ``LayerNormLinear``: a norm (RMSNorm via ``kernels.ops``) then a linear.

    Parameter names follow TE: ``layer_norm_weight`` (and ``layer_norm_bias`` for LayerNorm),
    ``weight``, ``bias``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, normalization: str,
                 eps: float):
        super().__init__()
        self.normalization, self.eps = normalization, eps
        self.layer_norm_weight = nn.Parameter(torch.ones(in_features))
        if normalization == "LayerNorm":
            self.layer_norm_bias = nn.Parameter(torch.zeros(in_features))
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalization == "RMSNorm":
            x = ops.rms_norm(x, self.layer_norm_weight, self.eps)
        else:
            x = F.layer_norm(x, x.shape[-1:], self.layer_norm_weight, self.layer_norm_bias, self.eps)
        return F.linear(x, self.weight, self.bias)


def layernorm_linear(in_features: int, out_features: int, bias: bool = False, *,
                     normalization: str = "RMSNorm", eps: float = 1e-5,
                     use_te: Optional[bool] = None) -> nn.Module:
    """``te.pytorch.LayerNormLinear`` (norm fused into the GEMM's input cast) or :class:`NormLinear`."""
    if normalization not in ("RMSNorm", "LayerNorm"):
        raise VpmoeError(f"normalization must be RMSNorm or LayerNorm, got {normalization!r}")
    if _use(use_te):
        return _te_pytorch().LayerNormLinear(in_features, out_features, bias=bias, eps=eps,
                                             normalization=normalization)
    return NormLinear(in_features, out_features, bias, normalization, eps)


def fp8_recipe(kind: str = "delayed", amax_history_len: int = 1024, margin: int = 0):
    """A TE FP8 recipe: ``delayed`` (DelayedScaling, HYBRID: E4M3 forward / E5M2 backward),
    ``current`` (Float8CurrentScaling) or ``mxfp8`` (MXFP8BlockScaling, Blackwell). Needs TE."""
    if kind not in FP8_RECIPES:
        raise VpmoeError(f"unknown FP8 recipe {kind!r}; choose one of {', '.join(FP8_RECIPES)}")
    _use(True)
    recipe = importlib.import_module("transformer_engine.common.recipe")
    if kind == "delayed":
        return recipe.DelayedScaling(fp8_format=recipe.Format.HYBRID, margin=margin,
                                     amax_history_len=amax_history_len, amax_compute_algo="max")
    name = "Float8CurrentScaling" if kind == "current" else "MXFP8BlockScaling"
    if not hasattr(recipe, name):
        raise VpmoeError(f"this Transformer Engine has no {name} (FP8 recipe {kind!r}); upgrade TE")
    cls = getattr(recipe, name)
    return cls(fp8_format=recipe.Format.HYBRID) if kind == "current" else cls()


def fp8_autocast(enabled: bool, recipe=None):
    """TE's ``fp8_autocast`` context when enabled (TE required), a no-op context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    _use(True)
    return _te_pytorch().fp8_autocast(enabled=True, fp8_recipe=recipe if recipe is not None else fp8_recipe())
