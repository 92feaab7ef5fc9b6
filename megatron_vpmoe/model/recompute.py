"""Activation recompute for the model's modules: non-reentrant ``torch.utils.checkpoint``.

Inside a recomputation (the replay of a forward during backward) :func:`is_recomputing` is
true, so side effects that must happen once per real forward (the routers' token counters)
are skipped. RNG state (dropout) is replayed by ``torch.utils.checkpoint``.
"""

from __future__ import annotations

import contextlib
import threading

from torch.utils.checkpoint import checkpoint

_state = threading.local()


def is_recomputing() -> bool:
    """True while a checkpointed forward is being replayed in backward."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _replaying():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def recomputed(fn, *args):
    """``fn(*args)``, keeping only ``args`` for backward and recomputing the rest."""
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _replaying()))
