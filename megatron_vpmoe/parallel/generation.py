"""KV-cache sampling through the parallel engine: every rank in lockstep, stage-to-stage under PP.

``generate(pm, prompts, ...)`` continues this rank's prompts with its shard of the model in any
layout (TP/EP/PP/DP). Every layer of an EP group does an all-to-all and a TP group all-reduces,
so every rank must call the model the same number of times with its peers: the ranks agree on
the number of prompt-length groups (a rank with fewer runs a one-token dummy group) and keep
decoding until every rank's rows are finished (one MAX all-reduce of the "still running" flag
per token over the default group). Finished rows stay in the batch and are fed ``eos_id`` (their
outputs are discarded), so the sampled rows -- and the draws from ``generator`` -- are exactly
those of :func:`megatron_vpmoe.model.generation.generate` in one process.

Under PP each stage keeps its own KV cache: stage 0 embeds, each stage runs its layers and
sends the hidden state (and layer 0's values under value residual) to the next stage on
``pp_group`` (interleaved chunks go round the ranks ``vpp`` times), the last stage applies the
head and samples, and broadcasts the tokens to the other stages.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_vpmoe.model.generation import by_length, check_tokens, sample_tokens
from megatron_vpmoe.model.layers import KVCache
from megatron_vpmoe.model.values import first_values_shape
from megatron_vpmoe.model.vpmoe import activation_dtype
from megatron_vpmoe.parallel.layout import stage_layers


def _lockstep() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _max_over_world(value: int, device: torch.device) -> int:
    if not _lockstep():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0])


class _Forward:
    """One forward of this rank's part of the model; the last position's logits on the rank
    that holds the head (None on the other pipeline stages)."""

    def __init__(self, pm, device: torch.device):
        self.m, self.ctx, self.device = pm.module, pm.ctx, device
        self.n_stages = self.ctx.pp * self.ctx.vpp

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> Optional[torch.Tensor]:
        m, ctx = self.m, self.ctx
        if ctx.pp == 1:
            return m(ids, position_ids=positions, cache=cache)[:, -1]
        group, n = ctx.pp_group, self.n_stages
        hidden, v_first, logits = None, None, None
        b, s = ids.shape
        for stage in range(n):
            if stage % ctx.pp != ctx.pp_rank:
                continue
            if stage == 0:
                hidden = m.embed(ids)
            else:
                hidden, v_first = self._recv(b, s, (stage - 1) % ctx.pp, group)
            layers = stage_layers(m.cfg.num_layers, n, stage)
            hidden, v_first = m.run_layers(hidden, positions, v_first, cache, layer_numbers=layers)
            if stage == n - 1:
                logits = m.head(hidden[:, -1:])[:, -1]
            else:
                dst = (stage + 1) % ctx.pp
                dist.send(hidden.float().contiguous(), group=group, group_dst=dst)
                if m.cfg.value_residual:
                    dist.send(v_first.float().contiguous(), group=group, group_dst=dst)
        return logits

    def _recv(self, b: int, s: int, src: int, group):
        cfg, dtype = self.m.cfg, activation_dtype(torch.empty(0, device=self.device))
        hidden = torch.empty(b, s, cfg.hidden_size, device=self.device)
        dist.recv(hidden, group=group, group_src=src)
        v_first = None
        if cfg.value_residual:
            v_first = torch.empty(b, s, *first_values_shape(cfg, self.ctx.tp), device=self.device)
            dist.recv(v_first, group=group, group_src=src)
            v_first = v_first.to(dtype)
        return hidden.to(dtype), v_first


@torch.no_grad()
def _generate_group(forward: _Forward, prompts: List[List[int]], real: bool, max_new_tokens: int,
                    temperature: float, top_p: float, eos_id: Optional[int], generator) -> List[List[int]]:
    """One prompt-length group, decoded until every rank is done. ``real=False``: a dummy group
    (this rank has no group at this index) that only keeps the collectives matched."""
    ctx, device = forward.ctx, forward.device
    holds_head = ctx.pp_rank == ctx.pp - 1
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    b, length = ids.shape
    cache = KVCache(forward.m.cfg.num_layers)
    logits = forward(ids, forward.m.default_positions(ids), cache)
    outputs: List[List[int]] = [[] for _ in prompts]
    running = torch.full((b,), real, dtype=torch.bool, device=device)
    fill = eos_id if eos_id is not None else 0
    for step in range(max_new_tokens):
        nxt = torch.full((b,), fill, dtype=torch.long, device=device)
        alive = running.nonzero().squeeze(1)
        if holds_head and alive.numel():  # only the live rows draw (as in one process)
            nxt[alive] = sample_tokens(logits[alive], temperature, top_p, generator)
        if ctx.pp > 1:  # the last stage's tokens to every stage
            dist.broadcast(nxt, group=ctx.pp_group, group_src=ctx.pp - 1)
        if ctx.tp > 1:  # TP peers continue with one set of tokens
            dist.broadcast(nxt, group=ctx.tp_group, group_src=0)
        for row in alive.tolist():
            outputs[row].append(int(nxt[row]))
        if eos_id is not None:
            running &= nxt != eos_id
        more = int(bool(running.any())) if step < max_new_tokens - 1 else 0
        if not _max_over_world(more, device):
            break
        positions = torch.full((b, 1), length, dtype=torch.long, device=device)
        logits = forward(nxt.unsqueeze(1), positions, cache)
        length += 1
    return outputs


def generate(pm, prompts: List[List[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> List[List[int]]:
    """Continue each of this rank's prompts by up to ``max_new_tokens`` tokens through the
    engine ``pm`` (a :class:`~megatron_vpmoe.parallel.ParallelModel`); the new tokens only, a
    row stops after ``eos_id`` (included). Every rank of the job must call it together; ranks
    of one pipeline (and one TP group) pass the same prompts and get the same results."""
    m = pm.module
    check_tokens(prompts, m.cfg.vocab_size, "prompts")
    device = next(m.parameters()).device
    forward = _Forward(pm, device)
    groups = sorted(by_length(prompts).items())
    n_groups = _max_over_world(len(groups) if max_new_tokens > 0 else 0, device)
    results: List[List[int]] = [[] for _ in prompts]
    was_training = m.training
    m.eval()
    try:
        for g in range(n_groups):
            if g < len(groups):
                rows = groups[g][1]
                outs = _generate_group(forward, [prompts[r] for r in rows], True, max_new_tokens,
                                       temperature, top_p, eos_id, generator)
                for r, out in zip(rows, outs):
                    results[r] = out
            else:
                _generate_group(forward, [[0]], False, max_new_tokens, temperature, top_p, eos_id,
                                generator)
        return results
    finally:
        m.train(was_training)
