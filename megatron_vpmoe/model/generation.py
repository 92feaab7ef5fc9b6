"""Sampling with a KV cache (greedy, temperature, top-p), for serving, eval and distillation.

Teacher-forced log-probabilities are :meth:`megatron_vpmoe.inference.Backend.score`.

Prompts of equal length are batched together (the attention kernel has no padding mask);
sliding-window layers keep only their window in the cache. Runs under ``torch.no_grad``
in eval mode and restores the model's training flag.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

import torch

from megatron_vpmoe.model.layers import KVCache


def _device(model) -> torch.device:
    return next(model.parameters()).device


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
            generator: Optional[torch.Generator]) -> torch.Tensor:
    """``logits [B, V]`` -> token ids ``[B]``; greedy when ``temperature == 0``."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    gen_device = generator.device if generator is not None else probs.device
    choice = torch.multinomial(probs.to(gen_device), 1, generator=generator)
    return choice.squeeze(1).to(logits.device)


def by_length(items: List[List[int]]) -> Dict[int, List[int]]:
    groups: Dict[int, List[int]] = defaultdict(list)
    for i, seq in enumerate(items):
        groups[len(seq)].append(i)
    return groups


def check_tokens(seqs: List[List[int]], vocab: int, what: str) -> None:
    for i, seq in enumerate(seqs):
        if not seq:
            raise ValueError(f"{what}[{i}] is empty")
        bad = [t for t in seq if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what}[{i}] has token ids outside [0, {vocab}): {bad[:5]}")


@torch.no_grad()
def _generate_group(model, prompts: List[List[int]], max_new_tokens, temperature, top_p, eos_id,
                    generator) -> List[List[int]]:
    device = _device(model)
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    cache = KVCache(model.cfg.num_layers)
    length = ids.shape[1]
    logits = model(ids, cache=cache)[:, -1]
    alive = torch.arange(len(prompts), device=device)  # original row of each cache row
    outputs: List[List[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        nxt = sample_tokens(logits, temperature, top_p, generator)
        for row, tok in zip(alive.tolist(), nxt.tolist()):
            outputs[row].append(tok)
        if eos_id is not None:
            running = nxt != eos_id
            if not bool(running.all()):
                keep = running.nonzero().squeeze(1)
                alive, nxt = alive[keep], nxt[keep]
                cache.select(keep)
        if alive.numel() == 0 or step == max_new_tokens - 1:
            break
        positions = torch.full((alive.numel(), 1), length, dtype=torch.long, device=device)
        logits = model(nxt.unsqueeze(1), position_ids=positions, cache=cache)[:, -1]
        length += 1
    return outputs


def generate(model, prompts: List[List[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None) -> List[List[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns the new tokens only
    (a sequence stops after emitting ``eos_id``, which is included)."""
    check_tokens(prompts, model.cfg.vocab_size, "prompts")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        results: List[List[int]] = [[] for _ in prompts]
        for _, rows in sorted(by_length(prompts).items()):
            outs = _generate_group(model, [prompts[r] for r in rows], max_new_tokens, temperature,
                                   top_p, eos_id, generator)
            for r, out in zip(rows, outs):
                results[r] = out
        return results
    finally:
        model.train(was_training)
