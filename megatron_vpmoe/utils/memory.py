"""Measured memory: this process's RSS and its high-water mark, and bytes saved for backward.

``peak_rss_bytes`` reads the kernel's own high-water mark (``VmHWM``), which nothing can miss
between samples; ``reset_peak_rss`` restarts it (``/proc/self/clear_refs``), so a phase's
peak (model construction, a step, a checkpoint save) is measured on its own.
:class:`SavedActivationMeter` counts the bytes of tensors autograd keeps for backward (each
storage once, parameters excluded) and their peak: the activation memory that pipeline
schedules and recompute change, measured exactly on any device.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List

import torch

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int:
    with open(_STATUS, encoding="ascii") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss_bytes() -> int:
    """Resident set size now."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS mark at the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Held:
    """A tensor saved for backward, counted until autograd lets go of it."""

    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: "SavedActivationMeter", key: int, tensor: torch.Tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):
        self.meter._release(self.key)


class SavedActivationMeter:
    """``with meter:`` counts bytes of tensors saved for backward; ``meter.peak`` is their peak.

    Storages are counted once however many saved tensors view them; storages of ``exclude``
    (the parameters) are not activations and are skipped. Tensors kept inside an activation-
    recompute region are not saved (that is the point of recompute) and are not counted."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self._live: Dict[int, List[int]] = {}  # storage pointer -> [bytes, references]
        self.current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._exclude:
            return t
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        return _Held(self, key, t)

    @staticmethod
    def _unpack(held):
        return held.tensor if isinstance(held, _Held) else held

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)
