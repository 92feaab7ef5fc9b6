"""Layout search: every valid layout planned, the fitting ones ranked by tokens/s/GPU, each rejected family's reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_vpmoe.plan.estimate import Plan, plan_layout
from megatron_vpmoe.plan.gpu import GpuSpec
from megatron_vpmoe.plan.layouts import enumerate_layouts
from megatron_vpmoe.utils.errors import ConfigError

GB = 1e9


@dataclass
class SearchResult:
    fitting: List[Plan]
    rejected: Dict[str, str] = field(default_factory=dict)  # family -> reason
    considered: int = 0
    closest: str = ""  # the non-fitting layout needing the least memory


def _family(plan_or_layout, schedule: str) -> str:
    lay = plan_or_layout
    return f"PP={lay.pp}{' VPP=' + str(lay.vpp) if lay.vpp > 1 else ''} {schedule} recompute={lay.recompute}"


def search(cfg, world: int, gpus_per_node: int, gpu: GpuSpec, efficiency: Optional[float] = None) -> SearchResult:
    gbs = cfg.train.global_batch_size
    fitting: List[Plan] = []
    best_miss: Dict[str, Tuple[float, str]] = {}
    invalid: Dict[str, str] = {}
    considered = 0
    for layout, reason in enumerate_layouts(cfg, world, gpus_per_node):
        considered += 1
        if reason is not None:
            invalid.setdefault(reason.split(":")[0], f"invalid, e.g. {layout.short()}: {reason}")
            continue
        plan = plan_layout(cfg, layout, gpu, efficiency)
        if plan.fits:
            fitting.append(plan)
            continue
        fam = _family(layout, layout.schedule(gbs))
        tight = plan.tight_rank
        comps = tight.components()
        top = max(comps, key=comps.get)
        text = (f"{fam}: best {layout.short()} needs {plan.peak / GB:.1f} GB on pipeline rank {tight.pp_rank} "
                f"(largest part {top} {comps[top] / GB:.1f} GB) > {gpu.memory_gb:g} GB")
        if fam not in best_miss or plan.peak < best_miss[fam][0]:
            best_miss[fam] = (plan.peak, text)
    fitting.sort(key=lambda p: (-p.tokens_per_s_per_gpu, p.peak))
    fitting_families = {_family(p.layout, p.layout.schedule(gbs)) for p in fitting}
    rejected = {fam: text for fam, (_, text) in sorted(best_miss.items()) if fam not in fitting_families}
    for key, reason in invalid.items():
        rejected[f"invalid ({key})"] = reason
    closest = min(best_miss.values())[1] if best_miss else next(iter(invalid.values()), "no valid layout")
    return SearchResult(fitting=fitting, rejected=rejected, considered=considered, closest=closest)


def require_fit(result: SearchResult, world: int, gpu: GpuSpec) -> None:
    """Raise a ConfigError (exit 2) when no layout fits: the config cannot run on this cluster."""
    if not result.fitting:
        raise ConfigError(f"no layout of {world} x {gpu.name} fits ({result.considered} tried); "
                          f"closest: {result.closest}",
                          key="model")
