"""The allowed range of every numeric config key, checked (finite, in range) before anything is built.

Each numeric leaf of the schema has an entry here (a test keeps it so); list items share their
list's entry (``distill.onpolicy.scorers[2].weight`` -> ``distill.onpolicy.scorers.weight``).
The upper bounds of structural sizes keep a typo such as ``model.num_layers=100000000000`` from
reaching parameter counting or allocation. ``config/reference.py`` shows each range in the
config reference table. Cross-field rules (``min_lr <= lr``, divisibility, ...) stay in
``schema.py``'s ``validate`` methods.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

from megatron_vpmoe.utils.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """``lo``..``hi`` (None: unbounded), each end closed unless ``*_open``."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return False
        return True

    def __str__(self) -> str:
        def num(x):
            return f"{x:g}" if isinstance(x, float) else f"{x:,}".replace(",", "_")

        if self.lo is not None and self.hi is not None:
            return f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        return "finite"


POSITIVE = Range(0.0, None, lo_open=True)  # > 0
NON_NEGATIVE = Range(0.0)  # >= 0
FRACTION = Range(0.0, 1.0)  # [0, 1]
PROBABILITY_LT1 = Range(0.0, 1.0, hi_open=True)  # [0, 1)


def _ints(lo: int, hi: int) -> Range:
    return Range(lo, hi)


_WIDTH = 1 << 20  # MLP / expert widths
_COUNT = 1 << 30  # steps, samples, intervals

RANGES = {
    "run.seed": _ints(0, 2**32 - 1),  # numpy (megatron-core's dataset shuffles) takes 32-bit seeds
    "model.vocab_size": _ints(1, 2**31 - 1),  # int32 token ids in the shards
    "model.hidden_size": _ints(1, 1 << 17),
    "model.num_layers": _ints(1, 10_000),
    "model.num_attention_heads": _ints(1, 4096),
    "model.num_query_groups": _ints(1, 4096),
    "model.kv_channels": _ints(1, 4096),
    "model.ffn_hidden_size": _ints(1, _WIDTH),
    "model.norm_epsilon": Range(0.0, 1.0, lo_open=True),
    "model.init_method_std": POSITIVE,
    "model.window_size": _ints(1, 1 << 24),
    "model.local_global_pattern": _ints(0, 10_000),
    "model.rotary_base": POSITIVE,
    "model.tpa_q_rank": _ints(1, 4096),
    "model.tpa_kv_rank": _ints(1, 4096),
    "model.attention_dropout": PROBABILITY_LT1,
    "model.hidden_dropout": PROBABILITY_LT1,
    "model.moe_first_k_dense": _ints(0, 10_000),
    "model.num_moe_experts": _ints(0, 1 << 16),
    "model.moe_router_topk": _ints(1, 1 << 16),
    "model.moe_ffn_hidden_size": _ints(1, _WIDTH),
    "model.moe_shared_expert_intermediate_size": _ints(0, _WIDTH),
    "model.moe_num_shared_experts": _ints(0, 1024),
    "model.moe_router_num_groups": _ints(1, 1 << 16),
    "model.moe_router_group_topk": _ints(1, 1 << 16),
    "model.moe_router_topk_scaling_factor": POSITIVE,
    "model.moe_router_bias_update_rate": NON_NEGATIVE,
    "model.moe_aux_loss_coeff": NON_NEGATIVE,
    "parallel.tensor": _ints(1, 1 << 16),
    "parallel.expert": _ints(1, 1 << 16),
    "parallel.pipeline": _ints(1, 10_000),
    "parallel.data": _ints(0, 1 << 20),
    "parallel.virtual_pipeline": _ints(1, 10_000),  # model chunks per pipeline rank (at most one layer each)
    "parallel.bucket_mb": Range(0.0, 1 << 20, lo_open=True),  # gradient-reduction bucket size bound
    "data.blend": NON_NEGATIVE,  # the weights
    "data.seq_length": _ints(1, 1 << 24),
    "data.num_workers": _ints(0, 1024),
    "train.steps": _ints(1, _COUNT),
    "train.global_batch_size": _ints(1, 1 << 24),
    "train.micro_batch_size": _ints(1, 1 << 24),
    "train.optimizer.lr": POSITIVE,
    "train.optimizer.min_lr": NON_NEGATIVE,
    "train.optimizer.beta1": PROBABILITY_LT1,
    "train.optimizer.beta2": PROBABILITY_LT1,
    "train.optimizer.eps": POSITIVE,
    "train.optimizer.weight_decay": NON_NEGATIVE,
    "train.optimizer.embedding_lr_mult": NON_NEGATIVE,
    "train.optimizer.clip_grad": NON_NEGATIVE,
    "train.schedule.warmup_steps": _ints(0, _COUNT),
    "train.schedule.wsd_decay_fraction": FRACTION,
    "train.eval_interval": _ints(0, _COUNT),
    "train.eval_iters": _ints(1, 1 << 24),
    "train.max_nonfinite_steps": _ints(1, _COUNT),
    "checkpoint.interval": _ints(0, _COUNT),
    "checkpoint.keep_last": _ints(0, 1 << 20),
    "log.interval": _ints(1, _COUNT),
    "log.profile_steps": _ints(1, _COUNT),  # each of [first, last]; LogConfig.validate checks their order
    "distill.reasoning_loss_weight": NON_NEGATIVE,
    "distill.final_loss_weight": NON_NEGATIVE,
    "distill.onpolicy.samples_per_prompt": _ints(1, 1 << 12),
    "distill.onpolicy.prompts_per_step": _ints(1, 1 << 16),
    "distill.onpolicy.max_new_tokens": _ints(1, 1 << 20),
    "distill.onpolicy.temperature": NON_NEGATIVE,
    "distill.onpolicy.top_p": Range(0.0, 1.0, lo_open=True),
    "distill.onpolicy.clip_eps": NON_NEGATIVE,
    "distill.onpolicy.ppo_epochs": _ints(1, 1 << 10),
    "distill.onpolicy.kl_coeff": NON_NEGATIVE,
    "distill.onpolicy.nll_anchor_coeff": NON_NEGATIVE,
    "distill.onpolicy.sample_table_interval": _ints(0, _COUNT),
    "distill.onpolicy.teacher_timeout_s": Range(0.0, 86_400.0, lo_open=True),
    "distill.onpolicy.teacher_retries": _ints(0, 1000),
    "distill.onpolicy.scorers.weight": NON_NEGATIVE,
}

_INDEX = re.compile(r"\[\d+\]")


def range_key(key: str) -> str:
    """The RANGES entry of a dotted key: list indices dropped."""
    return _INDEX.sub("", key)


def _numeric_leaves(node: Any, key: str) -> Iterator[Tuple[str, float]]:
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _numeric_leaves(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from _numeric_leaves(item, f"{key}[{i}]")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield key, node


def check_ranges(cfg: Any) -> None:
    """Raise :class:`ConfigError` naming the first numeric key that is not finite or out of range."""
    for key, value in _numeric_leaves(cfg, ""):
        rng = RANGES.get(range_key(key), Range())
        if not rng.contains(value):
            what = "must be finite" if isinstance(value, float) and not math.isfinite(value) else "out of range"
            raise ConfigError(f"{what}: {value!r} (allowed {rng})", key=key)
