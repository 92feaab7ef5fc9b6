"""The on-policy update's math: group-relative advantages, clipped policy gradient, k3 KL.

For one prompt's group of k samples with scores s_1..s_k (None = the teacher failed to score
that sample: it is dropped and takes no part in the statistics)::

    A_i = (s_i - mean(s)) / (std(s) + eps)        A_i = 0 when fewer than 2 valid or std ~ 0

Per student token t of sample i, with ratio r = exp(logp_new - logp_old)::

    pg_t  = -min(r A_i, clip(r, 1 - eps_clip, 1 + eps_clip) A_i)
    kl_t  = exp(logp_ref - logp_new) - (logp_ref - logp_new) - 1          (k3, >= 0, unbiased
                                                                            for KL(new || ref))
    loss  = mean over samples of  mean over its tokens of (pg_t + beta kl_t)

so a group whose scores are all equal contributes only its KL term (no policy gradient and no
division by zero).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def group_advantages(scores: Sequence[Optional[float]], eps: float = 1e-6) -> list:
    """Normalised advantages of one group; dropped (None/NaN) samples get None."""
    valid = [s for s in scores if s is not None and not math.isnan(s)]
    if len(valid) < 2:
        return [None if s is None or math.isnan(s) else 0.0 for s in scores]
    mean = sum(valid) / len(valid)
    std = math.sqrt(sum((s - mean) ** 2 for s in valid) / len(valid))
    out = []
    for s in scores:
        if s is None or math.isnan(s):
            out.append(None)
        elif std < 1e-8 * max(1.0, abs(mean)):
            out.append(0.0)
        else:
            out.append((s - mean) / (std + eps))
    return out


def k3_kl(logp_new: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(new || ref) from samples of ``new``; always >= 0."""
    log_ratio = logp_ref - logp_new
    return torch.exp(log_ratio) - log_ratio - 1.0


def clipped_pg(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
               clip_eps: float) -> torch.Tensor:
    """Per-token PPO-clip policy-gradient loss (to minimise). ``advantages`` broadcasts."""
    ratio = torch.exp(logp_new - logp_old)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped)


def sequence_terms(logp_new: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor,
                   advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float,
                   kl_coeff: float) -> dict:
    """Per-sample ``[B]`` terms: ``loss`` (token mean of ``pg + beta kl``), ``pg``, ``kl`` (token
    means), ``clipped`` (count of tokens whose ratio left the clip range) and ``tokens``. The
    engine's loss hook weights and sums them over micro-batches and ranks."""
    mask = mask.to(logp_new.dtype)
    tokens = mask.sum(1)
    per_seq_tokens = tokens.clamp(min=1)
    pg = clipped_pg(logp_new, logp_old, advantages[:, None], clip_eps)
    kl = k3_kl(logp_new, logp_ref)
    loss = ((pg + kl_coeff * kl) * mask).sum(1) / per_seq_tokens
    with torch.no_grad():
        ratio = torch.exp(logp_new - logp_old)
        clipped = (((ratio - 1).abs() > clip_eps).to(mask.dtype) * mask).sum(1)
        return {"loss": loss, "pg": (pg * mask).sum(1) / per_seq_tokens,
                "kl": (kl * mask).sum(1) / per_seq_tokens, "clipped": clipped, "tokens": tokens}


def policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, logp_ref: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, *, clip_eps: float,
                kl_coeff: float) -> tuple[torch.Tensor, dict]:
    """``[B, T]`` per-token log-probs of the sampled tokens, ``advantages [B]``, ``mask [B, T]``
    (1 on completion tokens). Returns the loss (mean over samples) and detached statistics."""
    t = sequence_terms(logp_new, logp_old, logp_ref, advantages, mask, clip_eps=clip_eps,
                       kl_coeff=kl_coeff)
    stats = {"pg": float(t["pg"].mean()), "kl": float(t["kl"].mean()),
             "clip_fraction": float(t["clipped"].sum() / t["tokens"].sum().clamp(min=1))}
    return t["loss"].mean(), stats


def per_byte(total_logprob: float, text: str) -> float:
    """A string's summed log-prob divided by its UTF-8 length (comparable across tokenizers)."""
    n = len(text.encode("utf-8"))
    if n == 0:
        raise ValueError("cannot normalise the log-prob of an empty string")
    return total_logprob / n
