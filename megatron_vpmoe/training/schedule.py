"""Learning-rate schedules as pure functions of the step: warmup + cosine, WSD, constant.

Pure functions of ``(step, config)`` make the scheduler state just the step number, which the
checkpoint stores, so resume is exact by construction.

- ``cosine``: linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to
  ``min_lr`` at ``train.steps``.
- ``wsd`` (warmup-stable-decay): warmup, constant ``lr``, then linear decay to ``min_lr``
  over the last ``wsd_decay_fraction`` of the steps.
- ``constant``: warmup, then ``lr``.
"""

from __future__ import annotations

import math


def learning_rate(step: int, train_cfg) -> float:
    """LR used for the optimizer update of 0-based ``step``."""
    opt, sched = train_cfg.optimizer, train_cfg.schedule
    total, warmup = train_cfg.steps, sched.warmup_steps
    if warmup > 0 and step < warmup:
        return opt.lr * (step + 1) / warmup
    if sched.kind == "constant":
        return opt.lr
    if sched.kind == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1.0 + math.cos(math.pi * progress))
    if sched.kind == "wsd":
        decay_steps = int(round(total * sched.wsd_decay_fraction))
        decay_start = max(warmup, total - decay_steps)
        if step < decay_start or decay_steps == 0:
            return opt.lr
        progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
        return opt.lr + (opt.min_lr - opt.lr) * progress
    raise ValueError(f"unknown schedule {sched.kind!r}")
