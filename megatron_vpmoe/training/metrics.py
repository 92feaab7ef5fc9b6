"""Run logging on rank 0: metrics.jsonl, TensorBoard, W&B, the progress bar, MFU and memory over ranks.

``{run.dir}/metrics.jsonl`` has one JSON object per optimizer step (``kind: "train"``) and per
validation (``kind: "valid"``). On resume, records after the resumed step are dropped first so
the file always describes one consistent run.
"""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from megatron_vpmoe.utils.atomic import atomic_write_text

PEAK_FLOPS_ENV = "VPMOE_PEAK_FLOPS"
# device-name fragment -> the planner's GPU spec file (megatron_vpmoe/plan/gpus/)
GPU_SPECS = {"GB200": "gb200", "H200": "h200", "H100": "h100-80gb", "A100": "a100-80gb"}


def flops_per_token(model_cfg, seq_length: int) -> float:
    """Training model FLOPs per token: the planner's count (``plan/flops.py``: matmuls only,
    embedding lookup excluded, LM head included, sliding windows counted as windows)."""
    from megatron_vpmoe.plan.flops import training_flops_per_token

    return training_flops_per_token(model_cfg, seq_length)


def peak_flops_per_device() -> Optional[float]:
    """Dense bf16 peak FLOP/s of one device: ``$VPMOE_PEAK_FLOPS`` if set, else the planner's
    spec of a known GPU, else None (CPU, unknown GPU: no MFU)."""
    if os.environ.get(PEAK_FLOPS_ENV):
        return float(os.environ[PEAK_FLOPS_ENV])
    if torch.cuda.is_available():
        from megatron_vpmoe.plan.gpu import load_gpu

        name = torch.cuda.get_device_name()
        for key, spec in GPU_SPECS.items():
            if key in name:
                return load_gpu(spec).peak_flops
    return None


def peak_memory_over_ranks(world_size: int) -> Dict[str, float]:
    """This step's per-rank peak memory reduced over all ranks (a collective: every rank calls
    it): the max and the rank holding it, so a log names the tight rank. GPU: max allocated;
    CPU: peak RSS."""
    if torch.cuda.is_available():
        mine = torch.cuda.max_memory_allocated() / 2**20
    else:
        from megatron_vpmoe.utils.memory import peak_rss_bytes

        mine = peak_rss_bytes() / 2**20
    if world_size == 1:
        return {"peak_memory_mb_max": mine, "peak_memory_rank_argmax": 0}
    from megatron_vpmoe.parallel.collectives import all_gather_single

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    gathered = torch.zeros(world_size, dtype=torch.float64, device=device)
    all_gather_single(gathered, torch.tensor([mine], dtype=torch.float64, device=device))
    return {"peak_memory_mb_max": float(gathered.max()), "peak_memory_rank_argmax": int(gathered.argmax())}


def memory_stats() -> Dict[str, float]:
    """This rank's peak memory. CPU: the kernel's peak-RSS mark of this process's own memory
    (``VmHWM``; ``ru_maxrss`` would also carry the peak of a large parent that forked and exec'd
    this process). With ``log.memory_report`` the mark restarts at every measured phase."""
    from megatron_vpmoe.utils.memory import peak_rss_bytes

    peak = peak_rss_bytes() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"cpu_max_rss_mb": peak / 2**20}
    if torch.cuda.is_available():
        out["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_max_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    return out


def router_bias_stats(model: torch.nn.Module) -> Dict[str, list]:
    """Per-MoE-layer min/max/std of the router's expert-bias buffers."""
    stats = {"router_bias_min": [], "router_bias_max": [], "router_bias_std": []}
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            b = buf.detach().float()
            stats["router_bias_min"].append(float(b.min()))
            stats["router_bias_max"].append(float(b.max()))
            stats["router_bias_std"].append(float(b.std()) if b.numel() > 1 else 0.0)
    return stats if stats["router_bias_min"] else {}


def router_entropy_stats(model: torch.nn.Module) -> Dict[str, list]:
    """Per-MoE-layer mean entropy of the routers' normalised scores since the last call, divided by
    ``ln(num experts)`` (1 = uniform routing); reads and resets the routers' on-device sums."""
    out = []
    for name, buf in model.named_buffers():
        if name.endswith("entropy_stats"):
            total, tokens = (float(x) for x in buf.detach().cpu())
            if tokens > 0:
                out.append(round(total / tokens, 5))
            buf.zero_()
    return {"router_entropy": out} if out else {}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class MetricsLogger:
    """Writes metrics on rank 0 only; every method is a no-op on other ranks."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool = False,
                 wandb_project: Optional[str] = None, run_name: Optional[str] = None,
                 resume_step: int = 0, config: Optional[dict] = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                from megatron_vpmoe.utils.errors import ConfigError

                raise ConfigError("W&B logging needs `pip install wandb`", key="log.wandb_project") from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config, resume="allow")

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def log(self, record: Dict[str, Any], *, scalars: bool = True) -> None:
        if not self.enabled:
            return
        record = _clean(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if not scalars:
            return
        step, kind = record["step"], record.get("kind", "train")
        flat = {f"{kind}/{k}": v for k, v in record.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self._tb is not None:
            for key, value in flat.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(flat, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
