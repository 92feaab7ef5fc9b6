"""AdamW with decoupled weight decay, parameter groups and gradient clipping.

Groups: weights with decay; 1-D parameters (norm scales, biases, attention sinks, mixing
scalars) without decay unless ``train.optimizer.decay_norms_and_biases``; embedding tables
(``nn.Embedding`` weights) without decay unless ``decay_embeddings`` and with their learning
rate multiplied by ``embedding_lr_mult``. Each group carries ``lr_mult``; the schedule sets
``lr = base_lr(step) * lr_mult``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from megatron_vpmoe.parallel.zero import inner_optimizer


def _embedding_param_ids(model: nn.Module) -> set:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def param_groups(model: nn.Module, opt_cfg) -> List[Dict]:
    """Split trainable parameters into (decay, lr_mult) groups; names kept for inspection."""
    embeddings = _embedding_param_ids(model)
    buckets: Dict[tuple, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embeddings:
            kind, decay, mult = "embedding", opt_cfg.decay_embeddings, opt_cfg.embedding_lr_mult
        elif param.ndim < 2:
            kind, decay, mult = "norm_bias", opt_cfg.decay_norms_and_biases, 1.0
        else:
            kind, decay, mult = "weight", True, 1.0
        key = (kind, decay, mult)
        group = buckets.setdefault(key, {
            "name": kind, "params": [], "param_names": [],
            "weight_decay": opt_cfg.weight_decay if decay else 0.0, "lr_mult": float(mult),
        })
        group["params"].append(param)
        group["param_names"].append(name)
    return list(buckets.values())


def build_optimizer(model: nn.Module, opt_cfg) -> torch.optim.Optimizer:
    """Fused AdamW: one kernel per device and dtype, and it takes the step's skip flag as a device
    tensor (:func:`optimizer_step`), so deciding to skip a non-finite step needs no host sync."""
    from torch.distributed.tensor import DTensor

    groups = param_groups(model, opt_cfg)
    for g in groups:
        g.pop("param_names")
        g["lr"] = opt_cfg.lr * g["lr_mult"]
    # DTensor parameters (a model parallelised with torch's own TP API) take the foreach path:
    # the fused kernel has no DTensor rule; the engine's shards are plain tensors
    fused = not any(isinstance(p, DTensor) for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2),
                             eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay, fused=fused)


def set_learning_rate(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0)


def optimizer_step(optimizer, skip: Optional[torch.Tensor] = None) -> None:
    """``optimizer.step()``, skipped on the device where ``skip`` (a bool tensor) is true: fused
    AdamW's ``found_inf`` leaves weights, moments and step counts as they were, with no host
    read of the flag (the trainer reads it later, at the log interval)."""
    inner = inner_optimizer(optimizer)  # the ZeRO wrapper steps its inner optimizer
    if skip is not None:
        if not inner.defaults.get("fused"):
            raise ValueError("optimizer_step(skip=...) needs a fused optimizer (build_optimizer makes one)")
        inner.found_inf = skip.to(torch.float32).reshape(())
    try:
        optimizer.step()
    finally:
        inner.__dict__.pop("found_inf", None)


def clip_gradients(parameters, max_norm: float, total_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Total L2 norm of the gradients before clipping (a 0-d tensor on the gradients' device);
    clips to ``max_norm`` when > 0.

    ``total_norm``: the norm when the caller computed it (the parallel engine's global norm
    over every shard); default the norm of these gradients. Nothing is read back to the host:
    a non-finite norm scales the gradients to non-finite values, and the caller skips the step.
    """
    params = [p for p in parameters if p.grad is not None]
    if total_norm is None:
        if not params:
            return torch.zeros((), dtype=torch.float64)
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, error_if_nonfinite=False)
    total_norm = torch.as_tensor(total_norm)
    if max_norm > 0 and params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
    return total_norm
