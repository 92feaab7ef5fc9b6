"""A token-mean loss hook for tests that drive ``ParallelModel.forward_backward`` directly.

``token_mean_step(pm, micro_batches)`` runs one forward+backward with the objective
``sum(token losses of the global batch) / global token count`` (the global count all-reduced
over the data-parallel group) and returns ``(loss_sum, n_tokens)`` over the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def token_mean_step(pm, micro_batches):
    count = float(sum(int((mb["labels"] != -100).sum()) for mb in micro_batches))
    total = torch.tensor([count])
    if pm.ctx.dp > 1:
        dist.all_reduce(total, group=pm.ctx.dp_group)
    n_tokens = max(float(total), 1.0)

    def token_mean(per_token, mb):
        summed = per_token.sum()
        return summed / n_tokens, summed.detach().double().view(1)

    stats = pm.forward_backward(micro_batches, token_mean)
    return float(stats[0]), n_tokens
