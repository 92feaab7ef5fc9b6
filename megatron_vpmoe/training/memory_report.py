"""Per-rank memory accounting of a run (``log.memory_report``): measured phase peaks beside shard sizes.

Each phase (model construction, the first step, the steady steps, a checkpoint save) restarts
the kernel's peak-RSS mark and records the RSS before it and the peak during it
(``utils/memory.py``), so "what did building the model cost this rank" is a measured number,
set beside the bytes of the rank's own parameters, gradients and optimizer state. Every rank
writes ``{run.dir}/memory/rank_<rank>.json`` (atomically) at the end of the run; rank 0 also
writes ``summary.json`` with the max over ranks and the rank holding it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch

from megatron_vpmoe.parallel.zero import inner_optimizer
from megatron_vpmoe.utils.atomic import atomic_write_text
from megatron_vpmoe.utils.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

MB = 2**20


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class RankMemoryReport:
    """Collects one rank's phases; ``enabled=False`` makes every call a no-op."""

    def __init__(self, enabled: bool, rank: int):
        self.enabled, self.rank = enabled, rank
        self.phases: Dict[str, Dict[str, float]] = {}
        self.sizes: Dict[str, float] = {}
        self.process_peak_mb = 0.0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the block; a phase seen again keeps its highest peak (steady steps)."""
        if not self.enabled:
            yield
            return
        before = rss_bytes()
        self.process_peak_mb = max(self.process_peak_mb, peak_rss_bytes() / MB)
        resettable = reset_peak_rss()
        try:
            yield
        finally:
            peak = peak_rss_bytes()
            self.process_peak_mb = max(self.process_peak_mb, peak / MB)
            entry = {"rss_before_mb": before / MB, "peak_mb": peak / MB,
                     "rise_mb": (peak - before) / MB, "exact": resettable}
            old = self.phases.get(name)
            if old is None or entry["peak_mb"] > old["peak_mb"]:
                self.phases[name] = entry

    def record_sizes(self, model, optimizer) -> None:
        """This rank's shard: parameters, gradients and optimizer state (bytes, as MB)."""
        if not self.enabled:
            return
        params = list(model.parameters())
        inner = inner_optimizer(optimizer)
        state = [t for s in inner.state.values() for t in s.values()]
        param_mb = tensor_bytes(params) / MB
        self.sizes = {"params_mb": param_mb,
                      "grads_mb": param_mb,  # a gradient per parameter, of its shape and dtype
                      "optimizer_state_mb": tensor_bytes(state) / MB,
                      "params": float(sum(p.numel() for p in params))}

    def write(self, run_dir: str, world_size: int, gather: Optional[callable] = None) -> None:
        if not self.enabled:
            return
        self.process_peak_mb = max(self.process_peak_mb, peak_rss_bytes() / MB)
        out = Path(run_dir) / "memory"
        out.mkdir(parents=True, exist_ok=True)
        record = {"rank": self.rank, "world_size": world_size, "process_peak_mb": self.process_peak_mb,
                  "phases": self.phases, "shard": self.sizes}
        atomic_write_text(out / f"rank_{self.rank:05d}.json", json.dumps(record, indent=1) + "\n")
        if gather is None:
            return
        records = gather(record)
        if self.rank == 0:
            worst = max(records, key=lambda r: r["process_peak_mb"])
            summary = {"max_process_peak_mb": worst["process_peak_mb"], "argmax_rank": worst["rank"],
                       "per_rank_peak_mb": [r["process_peak_mb"] for r in records]}
            atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
