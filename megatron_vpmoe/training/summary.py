"""The end-of-run summary's first/last figures: loss and bits per byte averaged over the first and last steps of the run, not single noisy batches."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

SMOOTH_FRACTION = 0.1  # each end averages this share of the steps run (at least one step)


def smoothed_ends(records: Sequence[dict], fraction: float = SMOOTH_FRACTION) -> Dict[str, Optional[dict]]:
    """``{"first": ..., "last": ...}``: each the mean ``loss`` (and ``bits_per_byte`` where every
    record has one) over ``ceil(fraction x len(records))`` records at that end, with the step
    range as ``steps`` (first, last) and the count as ``n``; None for both when there are none."""
    if not records:
        return {"first": None, "last": None}
    n = max(1, math.ceil(fraction * len(records)))

    def mean(part: List[dict]) -> dict:
        out = {"steps": (part[0]["step"], part[-1]["step"]), "n": len(part),
               "loss": sum(r["loss"] for r in part) / len(part)}
        if all(r.get("bits_per_byte") is not None for r in part):
            out["bits_per_byte"] = sum(r["bits_per_byte"] for r in part) / len(part)
        return out

    return {"first": mean(list(records[:n])), "last": mean(list(records[-n:]))}


def describe(rec: Optional[dict]) -> str:
    """``steps 1-10 (mean of 10) loss 8.3200 bits/byte 2.2000``, or ``n/a``."""
    if not rec:
        return "n/a"
    lo, hi = rec["steps"]
    where = f"step {lo}" if lo == hi else f"steps {lo}-{hi} (mean of {rec['n']})"
    bpb = rec.get("bits_per_byte")
    return f"{where} loss {rec['loss']:.4f}" + (f" bits/byte {bpb:.4f}" if bpb is not None else "")
