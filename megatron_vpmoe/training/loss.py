"""The training objective: role-aware NLL (plain text + span-normalised assistant spans) and bits per byte.

Every label position carries a role (the data pipeline's ``loss_mask``): 0 = no loss,
1 = assistant reasoning, 2 = assistant final answer, 3 = plain text (mid-training corpus).
A float/bool mask without roles (plain Megatron ``GPTDataset``) counts as role 3 where > 0.

How the terms combine, over one **global batch** (all micro-batches on all data-parallel ranks)::

    mean_k = (sum of NLL over tokens of role k) / N_k          for k in {text, reasoning, final}
    L_nll  = (w_text * mean_text + w_r * mean_reasoning + w_f * mean_final)
             / (w_text * [N_text > 0] + w_r * [N_r > 0] + w_f * [N_f > 0])
    L      = L_nll + aux      (aux: the MoE layers' aux loss, added by the layers themselves in backward)

with ``w_text = 1``, ``w_r = distill.reasoning_loss_weight``, ``w_f = distill.final_loss_weight``
and empty roles dropped. So a pure pretraining batch gives exactly the token-mean NLL, and an
assistant-only batch gives the weighted average of the two span means (a long reasoning trace
does not drown the final answer). The counts ``N_k`` are all-reduced *before* the forward pass,
so each micro-batch contributes ``sum_k w_k/(W N_k) * sum(NLL of its role-k tokens)`` and the
sum over micro-batches and ranks is exactly ``L_nll``, independent of the batch layout.

Bits per byte: ``sum NLL (nats) / ln 2 / UTF-8 bytes of the predicted tokens``, with bytes per
token id precomputed once from the tokenizer vocabulary (:func:`token_byte_lengths`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_vpmoe.data.chat import ROLE_FINAL, ROLE_NONE, ROLE_REASONING, ROLE_TEXT

NUM_ROLES = 4
ROLE_NAMES = {ROLE_REASONING: "reasoning", ROLE_FINAL: "final", ROLE_TEXT: "text"}


def check_roles(loss_mask: torch.Tensor) -> None:
    """Raise ValueError when an integer ``loss_mask`` holds a value that is not a role (0..3).
    The collation calls it on the host copy, so the step on the device never reads it back."""
    if loss_mask.dtype == torch.bool or loss_mask.is_floating_point() or not loss_mask.numel():
        return
    low, high = int(loss_mask.min()), int(loss_mask.max())
    if low < 0 or high >= NUM_ROLES:
        raise ValueError(f"loss_mask roles must be in 0..3, got {low}..{high}")


def roles_from_loss_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """Role per label position (int64). Integer masks are roles (checked by :func:`check_roles`
    where the batch is collated); float/bool masks mean role 3."""
    if loss_mask.dtype == torch.bool or loss_mask.is_floating_point():
        return torch.where(loss_mask > 0, ROLE_TEXT, ROLE_NONE).long()
    return loss_mask.long()


def role_counts(roles: torch.Tensor) -> torch.Tensor:
    """Token count per role, float64 ``[4]`` (index = role)."""
    return torch.bincount(roles.reshape(-1), minlength=NUM_ROLES).double()


@dataclass(frozen=True)
class LossWeights:
    text: float = 1.0
    reasoning: float = 1.0
    final: float = 1.0

    @classmethod
    def from_config(cls, distill_cfg) -> "LossWeights":
        return cls(1.0, float(distill_cfg.reasoning_loss_weight), float(distill_cfg.final_loss_weight))

    def by_role(self) -> torch.Tensor:
        return torch.tensor([0.0, self.reasoning, self.final, self.text], dtype=torch.float64)


def role_coefficients(global_counts: torch.Tensor, weights: LossWeights) -> torch.Tensor:
    """Per-role factor ``w_k / (W N_k)`` (0 for empty roles and role 0), float64 ``[4]``."""
    w = weights.by_role().to(global_counts.device)
    present = global_counts > 0
    total_weight = (w * present).sum()
    # no branch on the device value (a host sync): a batch without weighted tokens gives zeros
    present = present & (total_weight > 0)
    return torch.where(present, w / (total_weight.clamp(min=1e-300) * global_counts.clamp(min=1)),
                       torch.zeros_like(w))


class Objective:
    """The loss of one global batch, applied micro-batch by micro-batch.

    ``global_counts``: role counts over the whole global batch (all ranks). ``grad_scale``
    multiplies the NLL part so that gradient averaging over data-parallel replicas (DDP
    divides by the replica count) still yields the gradient of the global ``L_nll``.
    """

    def __init__(self, global_counts: torch.Tensor, weights: LossWeights, *, grad_scale: float = 1.0):
        self.coefficients = role_coefficients(global_counts, weights)
        self.grad_scale = grad_scale

    def __call__(self, per_token_nll: torch.Tensor, roles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(loss to backpropagate, nll_part)``; ``nll_part`` (detached) sums to L_nll."""
        coef = self.coefficients.to(per_token_nll.device)[roles].to(per_token_nll.dtype)
        nll_part = torch.where(coef > 0, per_token_nll * coef, 0.0).sum()  # no-loss positions drop out
        loss = nll_part * self.grad_scale
        return loss, nll_part.detach()


def role_nll_sums(per_token_nll: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
    """Summed NLL per role, float64 ``[4]`` (for logging: per-span means and bits per byte).
    Entry 0 (positions without loss) is always 0, so ``.sum()`` is the NLL of the counted tokens."""
    sums = torch.zeros(NUM_ROLES, dtype=torch.float64, device=per_token_nll.device).index_add_(
        0, roles.reshape(-1), per_token_nll.detach().reshape(-1).double()
    )
    sums[ROLE_NONE] = 0.0
    return sums


def counted_bytes(labels: torch.Tensor, roles: torch.Tensor, byte_lengths: torch.Tensor) -> torch.Tensor:
    """UTF-8 bytes of the labels that carry a loss (float64 scalar)."""
    table = byte_lengths.to(labels.device)
    return (table[labels.clamp(0, table.numel() - 1)] * (roles > 0)).sum().double()


def bits_per_byte(nll_sum_nats: float, num_bytes: float) -> Optional[float]:
    if num_bytes <= 0:
        return None
    return nll_sum_nats / math.log(2) / num_bytes


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 byte length of every token id ``< vocab_size`` (int64), computed once per run from
    the tokenizer's :meth:`~megatron_vpmoe.tokenizers.Tokenizer.token_byte_lengths` (0 for
    specials); ids past the tokenizer's vocabulary (embedding padding) count 0 bytes."""
    lengths = torch.as_tensor(tokenizer.token_byte_lengths(), dtype=torch.long)
    out = torch.zeros(vocab_size, dtype=torch.long)
    n = min(vocab_size, lengths.numel())
    out[:n] = lengths[:n]
    return out
