"""The one log-prob helper: the log-probability a model's logits give each target token."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., target]`` in float32: ``logits [..., V]``, ``targets [...]`` -> ``[...]``."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1).to(logits.device)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
