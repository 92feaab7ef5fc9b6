"""Seed statistics for experiment reports: mean ± std, the seed-spread test, curve interpolation, loss spikes."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

SPREAD_FACTOR = 2.0  # a difference must exceed 2 x the pooled seed standard deviation to count


def mean_std(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """``{mean, std, n}`` over the non-None values (sample std, ddof 1; 0.0 for a single value)."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    m = sum(xs) / len(xs)
    std = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": std, "n": len(xs)}


def compare(a: Dict, b: Dict) -> Dict[str, Optional[float]]:
    """``a`` against ``b`` (two :func:`mean_std` results): the difference of the means, the pooled
    seed spread ``sqrt((std_a^2 + std_b^2) / 2)``, and whether ``|difference| > SPREAD_FACTOR x spread``.
    With one seed there is no spread to compare against: ``distinguishable`` is None."""
    if a["mean"] is None or b["mean"] is None:
        return {"diff": None, "spread": None, "distinguishable": None}
    diff = a["mean"] - b["mean"]
    if min(a["n"], b["n"]) < 2:
        return {"diff": diff, "spread": None, "distinguishable": None}
    spread = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)
    return {"diff": diff, "spread": spread, "distinguishable": abs(diff) > SPREAD_FACTOR * spread}


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> Optional[float]:
    """``y`` at ``x`` on the piecewise-linear curve (None outside the measured range)."""
    pts = [(a, b) for a, b in zip(xs, ys) if b is not None]
    if not pts or x < pts[0][0] - 1e-9 * abs(x) or x > pts[-1][0] + 1e-9 * abs(x):
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1] if x >= pts[-1][0] else pts[0][1]


def smooth(values: Sequence[Optional[float]], window: int) -> List[Optional[float]]:
    """Trailing moving average over the last ``window`` values (None values skipped)."""
    out: List[Optional[float]] = []
    for i in range(len(values)):
        xs = [v for v in values[max(0, i - window + 1): i + 1] if v is not None]
        out.append(sum(xs) / len(xs) if xs else None)
    return out


def spike_count(losses: List[float], window: int = 10, factor: float = 1.2) -> int:
    """Steps whose loss exceeds ``factor`` x the median of the previous ``window`` steps."""
    spikes = 0
    for i in range(window, len(losses)):
        median = sorted(losses[i - window: i])[window // 2]
        if losses[i] > factor * median:
            spikes += 1
    return spikes
