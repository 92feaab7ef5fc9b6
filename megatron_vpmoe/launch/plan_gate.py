"""The planner's check before a SLURM submission: plan the layout the job will run; refuse a predicted non-fit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from megatron_vpmoe.utils.errors import ConfigError


def plan_gate(config: str, overrides: List[str], nodes: int, gpus_per_node: int, gpu: str, force: bool,
              write: bool = True) -> List[str]:
    """The plan summary for the config's own layout on ``nodes x gpus_per_node``; raises a
    ConfigError (exit 2) when it is predicted not to fit, unless ``force``. Writes the summary to
    ``{run.dir}/launch/plan.txt`` when ``write``. CPU jobs (no GPUs) are not planned, nor layouts
    the planner cannot lay out (the launcher and the trainer report those themselves)."""
    if gpus_per_node < 1:
        return []
    from megatron_vpmoe.config import load_config
    from megatron_vpmoe.plan.table import plan_table
    from megatron_vpmoe.plan.estimate import plan_layout
    from megatron_vpmoe.plan.gpu import load_gpu
    from megatron_vpmoe.plan.layouts import check_layout, from_config

    cfg = load_config(config, overrides)
    world = nodes * gpus_per_node
    layout = replace(from_config(cfg, world), world=world)
    spec = load_gpu(gpu)
    try:
        check_layout(cfg, layout)
    except ConfigError as err:
        return [f"vpmoe plan: not planned ({err})"]
    plan = plan_layout(cfg, layout, spec)
    lines = ["vpmoe plan (estimate) for this job:", *plan_table(plan)]
    if write:
        out = Path(cfg.run.dir) / "launch"
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if not plan.fits and not force:
        tight = plan.tight_rank
        raise ConfigError(f"predicted not to fit: {plan.peak / 1e9:.1f} GB on pipeline rank {tight.pp_rank} > "
                          f"{plan.gpu.memory_gb:g} GB ({plan.gpu.name}); try `vpmoe plan --config {config} "
                          f"--nodes {nodes} --gpus-per-node {gpus_per_node}` for a layout that fits, or --force",
                          key="parallel")
    return lines


def suggested_layout(cfg, nodes: int, ranks_per_node: int, gpu: str) -> Optional[str]:
    """The ``--set`` overrides for the layout ``vpmoe plan`` ranks first for ``cfg`` on ``nodes x
    ranks_per_node`` ranks of ``gpu``, as one line; None when no layout fits."""
    from megatron_vpmoe.plan.gpu import load_gpu
    from megatron_vpmoe.plan.search import search

    result = search(cfg, nodes * ranks_per_node, ranks_per_node, load_gpu(gpu))
    if not result.fitting:
        return None
    lay = result.fitting[0].layout
    sets = [("parallel.tensor", lay.tp), ("parallel.expert", lay.ep), ("parallel.pipeline", lay.pp)]
    if lay.pp > 1:
        sets.append(("parallel.virtual_pipeline", lay.vpp))
    sets += [("train.micro_batch_size", lay.mb), ("train.recompute", lay.recompute)]
    return f"{lay.short()} (" + " ".join(f"--set {k}={v}" for k, v in sets) + ")"
