"""Layout-independent parameter initialisation: every value is a function of (seed, global name, expert).

A parameter's values are drawn from its own ``torch.Generator``, seeded from the run's base
seed and the parameter's single-process name (and, for routed experts, the global expert
index). So any shard of any parameter can be initialised on its own, without the rest of the
model existing anywhere: an expert-parallel rank draws only its experts, a tensor-parallel
rank draws the parameter (one at a time) and keeps its slice, a pipeline stage touches only
its layers. Every layout therefore starts from exactly the single-process weights.

Rules (by the parameter's last name component): ``value_lambda`` 0.5, ``sinks``, biases and
GRAPE-M's ``freq_log_scale``/``basis_skew`` 0,
matrices ~ N(0, std), other vectors (norm weights) 1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron_vpmoe.model.splits import is_expert


@dataclass(frozen=True)
class ShardSlice:
    """Where a local tensor sits in its parameter: a block of experts (dim 0) and/or a TP split."""

    expert_offset: int = 0  # global index of the first local expert (expert-parallel params)
    split_dim: Optional[int] = None  # tensor-parallel split dimension (None = not split)
    split_rank: int = 0
    split_size: int = 1


# shard_of(name, param) -> ShardSlice (None: the full parameter)
ShardOf = Callable[[str, torch.Tensor], Optional[ShardSlice]]


def draw_base_seed() -> int:
    """One draw from the global torch RNG: ``torch.manual_seed(s)`` then this gives the same base
    seed in every process."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _generator(base_seed: int, name: str, expert: Optional[int] = None) -> torch.Generator:
    key = f"{base_seed}:{name}" + ("" if expert is None else f":{expert}")
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1
    return torch.Generator().manual_seed(seed)


def _fill(out: torch.Tensor, name: str, std: float, base_seed: int, expert: Optional[int],
          full_shape: torch.Size, narrow: Optional[ShardSlice]) -> None:
    """Fill ``out`` (one expert's or a whole parameter's local values)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "value_lambda":
        out.fill_(0.5)
    elif leaf in ("freq_log_scale", "basis_skew"):  # GRAPE-M starts at RoPE's spectrum and planes
        out.zero_()
    elif leaf == "sinks" or "bias" in leaf:
        out.zero_()
    elif len(full_shape) >= 2:
        generator = _generator(base_seed, name, expert)
        whole = narrow is None or narrow.split_dim is None
        if whole and out.is_contiguous() and out.dtype == torch.float32 and out.device.type == "cpu":
            out.normal_(0.0, std, generator=generator)  # in place: no second copy of a large matrix
            return
        values = torch.empty(full_shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
        if not whole:
            size = full_shape[narrow.split_dim] // narrow.split_size
            values = values.narrow(narrow.split_dim, narrow.split_rank * size, size)
        out.copy_(values)
    else:
        out.fill_(1.0)


@torch.no_grad()
def initialize_parameters(module: torch.nn.Module, base_seed: int, std: float,
                          shard_of: Optional[ShardOf] = None) -> None:
    """Initialise every parameter of ``module`` (named as in the single-process model) per the
    module rules; ``shard_of`` says which slice of the global parameter each local tensor is."""
    for name, p in module.named_parameters():
        where = shard_of(name, p) if shard_of is not None else None
        if is_expert(p):  # [local experts, ...]: one generator per expert
            offset = where.expert_offset if where is not None else 0
            for i in range(p.shape[0]):
                _fill(p[i], name, std, base_seed, offset + i, p.shape[1:], None)
            continue
        full = list(p.shape)
        if where is not None and where.split_dim is not None:
            full[where.split_dim] *= where.split_size
        _fill(p, name, std, base_seed, None, torch.Size(full), where)
