"""Parallel layouts for the planner: parse ``tp=..,ep=..``, check divisibility, enumerate the valid ones."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Iterator, List, Optional, Tuple

from megatron_vpmoe.config.schema import ParallelConfig, VpmoeConfig
from megatron_vpmoe.utils.errors import ConfigError

RECOMPUTE = ("none", "selective", "full")
KEYS = ("tp", "ep", "pp", "vpp", "mb", "recompute", "zero")


@dataclass(frozen=True)
class Layout:
    """TP x EP x PP (x VPP chunks) over ``world`` ranks; DP = world / (TP x PP); ``mb`` samples per micro-batch."""

    world: int
    tp: int = 1
    ep: int = 1
    pp: int = 1
    vpp: int = 1
    mb: int = 1
    recompute: str = "none"
    zero: bool = False  # distributed optimizer (ZeRO-2: AdamW state and reduced gradients split over DP)
    overlap: bool = True  # parallel.overlap_grad_reduce: persistent bucket buffers, no gradient copy

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def expert_dp(self) -> int:
        """Ranks that hold the same routed experts (their gradient all-reduce group)."""
        return self.world // (self.tp * self.ep * self.pp)

    def micro_batches(self, global_batch: int) -> int:
        return global_batch // (self.mb * self.dp)

    def schedule(self, global_batch: int) -> str:
        if self.pp == 1:
            return "none"
        if self.micro_batches(global_batch) < self.pp:
            return "gpipe"
        return "interleaved-1f1b" if self.vpp > 1 else "1f1b"

    def short(self) -> str:
        out = f"tp={self.tp},ep={self.ep},pp={self.pp}"
        if self.vpp > 1:
            out += f",vpp={self.vpp}"
        out += f",mb={self.mb},recompute={self.recompute}"
        return out + (",zero=1" if self.zero else "")

    def as_dict(self) -> dict:
        return dict(asdict(self), dp=self.dp)


def from_config(cfg: VpmoeConfig, world: int) -> Layout:
    """The layout a run config asks for on ``world`` ranks."""
    p = cfg.parallel
    return Layout(world=world, tp=p.tensor, ep=p.expert, pp=p.pipeline, vpp=p.virtual_pipeline if p.pipeline > 1 else 1,
                  mb=cfg.train.micro_batch_size, recompute=cfg.train.recompute, zero=p.distributed_optimizer,
                  overlap=p.overlap_grad_reduce)


def parse_layout(text: str, base: Layout) -> Layout:
    """``tp=2,ep=4,pp=2,vpp=1,mb=1,recompute=selective`` over ``base`` (unnamed keys keep its values)."""
    values = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in KEYS:
            raise ConfigError(f"expected KEY=VALUE with KEY in {', '.join(KEYS)}, got {part!r}", key="--layout")
        if key == "recompute":
            if value not in RECOMPUTE:
                raise ConfigError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {value!r}",
                                  key="--layout recompute")
            values[key] = value
        elif key == "zero":
            values[key] = value.lower() in ("1", "true", "yes")
        else:
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"must be an integer, got {value!r}", key=f"--layout {key}") from None
    return replace(base, **values)


def check_layout(cfg: VpmoeConfig, layout: Layout) -> None:
    """Raise a ConfigError naming the key if ``layout`` cannot run ``cfg`` on ``layout.world`` ranks."""
    for key in ("tp", "ep", "pp", "vpp", "mb"):
        if getattr(layout, key) < 1:
            raise ConfigError(f"must be >= 1, got {getattr(layout, key)}", key=f"layout {key}")
    # the trainer's own checks (heads/groups/FFN vs TP, experts vs EP, layers vs PP x VPP)
    ParallelConfig(tensor=layout.tp, expert=layout.ep, pipeline=layout.pp,
                   virtual_pipeline=layout.vpp).validate(cfg.model)
    if layout.world % (layout.tp * layout.pp):
        raise ConfigError(f"world size {layout.world} is not divisible by tp x pp = {layout.tp * layout.pp}",
                          key="layout tp/pp")
    if layout.world % (layout.tp * layout.ep * layout.pp):
        raise ConfigError(f"world size {layout.world} is not divisible by tp x ep x pp = "
                          f"{layout.tp * layout.ep * layout.pp}", key="layout ep")
    replace(cfg.train, micro_batch_size=layout.mb).check_batch_layout(layout.dp)
    if layout.vpp > 1 and layout.micro_batches(cfg.train.global_batch_size) % layout.pp:
        raise ConfigError(f"interleaved 1F1B needs micro-batches ({layout.micro_batches(cfg.train.global_batch_size)}) "
                          f"to be a multiple of pp ({layout.pp})", key="layout vpp")


MAX_WORLD = 1 << 20  # ranks the planner accepts (about a million GPUs; larger is a typo, not a cluster)


def divisors(n: int) -> List[int]:
    """The divisors of ``n >= 1`` in increasing order, from its prime factorisation (trial division to sqrt(n))."""
    if n < 1:
        raise ValueError(f"divisors of {n}: need n >= 1")
    factors: List[Tuple[int, int]] = []
    rest, p = n, 2
    while p * p <= rest:
        if rest % p == 0:
            k = 0
            while rest % p == 0:
                rest //= p
                k += 1
            factors.append((p, k))
        p += 1 if p == 2 else 2
    if rest > 1:
        factors.append((rest, 1))
    out = [1]
    for prime, k in factors:
        out = [d * prime ** e for d in out for e in range(k + 1)]
    return sorted(out)


def enumerate_layouts(cfg: VpmoeConfig, world: int, gpus_per_node: int,
                      micro_batches: Tuple[int, ...] = (1, 2, 4, 8)) -> Iterator[Tuple[Layout, Optional[str]]]:
    """Every candidate layout with None (valid) or the reason it is invalid. TP stays inside a node."""
    model = cfg.model
    experts = model.num_moe_experts or 1
    for tp in [d for d in divisors(world) if d <= gpus_per_node]:
        for pp in [d for d in divisors(world // tp) if d <= model.num_layers]:
            for ep in [d for d in divisors(world // (tp * pp)) if experts % d == 0]:
                for vpp in (1, 2, 4) if pp > 1 else (1,):
                    for mb in micro_batches:
                        for rc in RECOMPUTE:
                            layout = Layout(world=world, tp=tp, ep=ep, pp=pp, vpp=vpp, mb=mb, recompute=rc,
                                            zero=cfg.parallel.distributed_optimizer)
                            try:
                                check_layout(cfg, layout)
                            except ConfigError as err:
                                yield layout, str(err)
                                continue
                            yield layout, None
