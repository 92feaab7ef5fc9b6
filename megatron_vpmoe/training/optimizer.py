"""AdamW with decoupled weight decay, parameter groups and gradient clipping.

Groups: weights with decay; 1-D parameters (norm scales, biases, attention sinks, mixing
scalars) without decay unless ``train.optimizer.decay_norms_and_biases``; embedding tables
(``nn.Embedding`` weights) without decay unless ``decay_embeddings`` and with their learning
rate multiplied by ``embedding_lr_mult``. Each group carries ``lr_mult``; the schedule sets
``lr = base_lr(step) * lr_mult``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn


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
    groups = param_groups(model, opt_cfg)
    for g in groups:
        g.pop("param_names")
        g["lr"] = opt_cfg.lr * g["lr_mult"]
    return torch.optim.AdamW(groups, lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2),
                             eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_mult", 1.0)


def clip_gradients(parameters, max_norm: float, total_norm: Optional[float] = None) -> float:
    """Total L2 norm of the gradients (before clipping); clips to ``max_norm`` when > 0.

    ``total_norm``: the norm when the caller computed it (the parallel engine's global norm
    over every shard); default the norm of these gradients. Non-finite norms are returned as
    they are and nothing is scaled (the step is skipped).
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0 if total_norm is None else float(total_norm)
    if total_norm is None:
        total_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params], 2.0,
                                                         error_if_nonfinite=False))
    if max_norm > 0 and math.isfinite(total_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(total_norm))
    return float(total_norm)
