"""GPU spec files: peak FLOP/s, memory, NVLink/InfiniBand bandwidth, kernels; shipped or a custom YAML."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List

import yaml

from megatron_vpmoe.utils.errors import ConfigError

SPEC_DIR = Path(__file__).resolve().parent / "gpus"
FIELDS = {"name": str, "memory_gb": (int, float), "bf16_dense_tflops": (int, float), "memory_gbps": (int, float),
          "nvlink_gbps": (int, float),
          "nvlink_domain": int, "ib_gbps": (int, float), "kernels": str, "framework_overhead_gb": (int, float),
          "sources": list}


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator: decimal GB and GB/s (links each way, per GPU), dense bf16 TFLOP/s."""

    name: str
    memory_gb: float
    bf16_dense_tflops: float
    memory_gbps: float  # device memory bandwidth (GB/s): the throughput model's memory-bound work
    nvlink_gbps: float
    nvlink_domain: int
    ib_gbps: float
    kernels: str  # "fused" (GPU kernels) or "reference" (kernels/reference.py, CPU)
    framework_overhead_gb: float
    sources: List[str]

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def peak_flops(self) -> float:
        return self.bf16_dense_tflops * 1e12


def shipped_gpus() -> List[str]:
    """Names accepted by ``--gpu`` without a path."""
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


# what people type for a shipped spec; a bare "a100" is the smaller card (a plan that fits 40 GB fits 80)
ALIASES = {"h100": "h100-80gb", "h100-80": "h100-80gb", "h100-sxm": "h100-80gb", "h100-sxm-80gb": "h100-80gb",
           "h200-141gb": "h200", "h200-sxm": "h200", "a100": "a100-40gb", "a100-40": "a100-40gb",
           "a100-sxm-40gb": "a100-40gb", "a100-80": "a100-80gb", "a100-sxm-80gb": "a100-80gb",
           "gb200-nvl72": "gb200"}


def shipped_name(name: str) -> str:
    """The shipped spec a ``--gpu`` name means: itself, or its alias (case, ``_`` and spaces ignored)."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    return key if (SPEC_DIR / f"{key}.yaml").is_file() else ALIASES.get(key, name)


def load_gpu(name_or_path: str) -> GpuSpec:
    """A shipped spec by name (``h100-80gb``, or an alias such as ``h100``) or a YAML file with
    every field of :data:`FIELDS`."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SPEC_DIR / f"{shipped_name(name_or_path)}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown GPU {name_or_path!r}; shipped: {', '.join(shipped_gpus())} "
                              f"(aliases: {', '.join(sorted(ALIASES))}; or a spec YAML path)", key="--gpu")
    if not path.is_file():
        raise ConfigError(f"GPU spec file not found: {path}", key="--gpu")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {str(err).splitlines()[0]}", file=str(path)) from None
    except RecursionError:  # PyYAML's composer recurses per nesting level
        raise ConfigError("not a GPU spec: YAML nested too deeply to parse", file=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError("a GPU spec must be a mapping of fields", file=str(path))
    for key, kind in FIELDS.items():
        if key not in raw:
            raise ConfigError(f"missing field (a spec needs: {', '.join(FIELDS)})", key=key, file=str(path))
        if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise ConfigError(f"bad value {raw[key]!r}", key=key, file=str(path))
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown field (known: {', '.join(FIELDS)})", key=unknown[0], file=str(path))
    if raw["kernels"] not in ("fused", "reference"):
        raise ConfigError("must be 'fused' or 'reference'", key="kernels", file=str(path))
    for key in ("memory_gb", "bf16_dense_tflops", "memory_gbps", "nvlink_gbps", "ib_gbps", "nvlink_domain"):
        if not 0 < raw[key] < math.inf:  # also false for nan
            raise ConfigError(f"must be a finite number > 0, got {raw[key]}", key=key, file=str(path))
    if not 0 <= raw["framework_overhead_gb"] < math.inf:
        raise ConfigError(f"must be a finite number >= 0, got {raw['framework_overhead_gb']}",
                          key="framework_overhead_gb", file=str(path))
    return GpuSpec(**{k: raw[k] for k in FIELDS})
