"""experiments/stats.py against hand-computed values: the sample (ddof 1) standard deviation, the pooled
seed spread and the 2x rule at its boundary, interpolation, the trailing average and loss spikes."""

from __future__ import annotations

import math

import pytest

from megatron_vpmoe.experiments.stats import compare, interpolate, mean_std, smooth, spike_count


def _ms(mean, std, n):
    return {"mean": mean, "std": std, "n": n}


def test_mean_std_is_the_sample_std():
    out = mean_std([1, 2, 3, 4])  # squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, over n - 1 = 3
    assert out["n"] == 4 and out["mean"] == 2.5
    assert out["std"] == pytest.approx(math.sqrt(5 / 3), rel=1e-12)  # population would be sqrt(5/4)
    two = mean_std([2.0, 4.0])
    assert two["std"] == pytest.approx(math.sqrt(2), rel=1e-12)  # population would be 1


def test_mean_std_skips_none_and_nan_and_handles_one_and_zero_values():
    out = mean_std([2.0, None, float("nan"), 4.0])
    assert out == {"mean": 3.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert mean_std([5]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0}
    assert mean_std([None, float("nan")]) == {"mean": None, "std": None, "n": 0}


def test_pooled_spread_is_the_rms_of_the_two_stds():
    out = compare(_ms(10.0, 3.0, 3), _ms(2.0, 4.0, 3))
    assert out["diff"] == 8.0
    assert out["spread"] == pytest.approx(math.sqrt(12.5), rel=1e-12)  # not (3 + 4) / 2, not sqrt(3^2 + 4^2)
    assert out["distinguishable"] is True  # 8 > 2 x 3.536


@pytest.mark.parametrize("diff, expected", [
    (1.5, False),  # above 1 x spread, below 2 x: not distinguishable under the 2x rule
    (1.0, False),
    (2.0, False),  # exactly 2 x spread: not more than it
    (2.0 + 1e-9, True),
    (-2.0 - 1e-9, True),  # either direction
    (-1.5, False),
    (0.0, False),
])
def test_two_spreads_rule_at_its_boundary(diff, expected):
    out = compare(_ms(5.0 + diff, 1.0, 2), _ms(5.0, 1.0, 2))  # spread exactly 1
    assert out["spread"] == 1.0
    assert out["diff"] == pytest.approx(diff)
    assert out["distinguishable"] is expected


def test_rule_scales_with_the_spread():
    # spread sqrt((4 + 4) / 2) = 2: a difference of 3 is over 1 x but under 2 x
    assert compare(_ms(3.0, 2.0, 5), _ms(0.0, 2.0, 5))["distinguishable"] is False
    assert compare(_ms(4.1, 2.0, 5), _ms(0.0, 2.0, 5))["distinguishable"] is True


def test_compare_with_one_seed_or_no_values():
    assert compare(_ms(3.0, 0.0, 1), _ms(1.0, 0.5, 4)) == {"diff": 2.0, "spread": None, "distinguishable": None}
    assert compare(_ms(3.0, 0.5, 4), _ms(1.0, 0.0, 1))["distinguishable"] is None
    assert compare(_ms(3.0, 0.5, 2), _ms(1.0, 0.5, 2))["spread"] == 0.5  # n = 2 is enough
    assert compare(_ms(None, None, 0), _ms(1.0, 0.5, 4)) == {"diff": None, "spread": None, "distinguishable": None}
    assert compare(_ms(1.0, 0.5, 4), _ms(None, None, 0))["diff"] is None
    # identical seeds (spread 0): any difference counts, none does not
    assert compare(_ms(1.0, 0.0, 3), _ms(1.0, 0.0, 3))["distinguishable"] is False
    assert compare(_ms(1.5, 0.0, 3), _ms(1.0, 0.0, 3))["distinguishable"] is True


def test_interpolate_hand_values():
    xs, ys = [0.0, 10.0, 20.0], [0.0, 100.0, 400.0]
    assert interpolate(xs, ys, 5.0) == 50.0
    assert interpolate(xs, ys, 15.0) == 250.0
    assert interpolate(xs, ys, 0.0) == 0.0 and interpolate(xs, ys, 10.0) == 100.0 and interpolate(xs, ys, 20.0) == 400.0
    assert interpolate(xs, ys, -0.5) is None and interpolate(xs, ys, 20.5) is None
    assert interpolate(xs, [0.0, None, 400.0], 10.0) == 200.0  # a missing point is skipped
    assert interpolate(xs, [None, None, None], 10.0) is None
    assert interpolate([3.0], [7.0], 3.0) == 7.0


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert smooth([1.0, 2.0, 3.0, 4.0], 3) == [1.0, 1.5, 2.0, 3.0]
    assert smooth([1.0, None, 3.0], 2) == [1.0, 1.0, 3.0]
    assert smooth([None, None], 2) == [None, None]
    assert smooth([4.0, 8.0], 1) == [4.0, 8.0]


def test_spike_count_boundary_and_median():
    # window 3: the median of [1, 1, 1] is 1; 1.2 is not more than 1.2 x 1, 1.21 is
    assert spike_count([1.0, 1.0, 1.0, 1.2], window=3, factor=1.2) == 0
    assert spike_count([1.0, 1.0, 1.0, 1.21], window=3, factor=1.2) == 1
    # window 4: the median is the upper middle value sorted([1, 2, 3, 4])[2] = 3: 3.5 < 1.2 x 3 (the lower
    # middle value 2 would make it a spike)
    assert spike_count([1.0, 2.0, 3.0, 4.0, 3.5], window=4, factor=1.2) == 0
    assert spike_count([1.0, 2.0, 3.0, 4.0, 3.7], window=4, factor=1.2) == 1
    # the first ``window`` steps are never counted; every later step is
    assert spike_count([100.0, 1.0, 1.0], window=2, factor=1.2) == 0
    # 5 vs the median 1 of [1, 1] is one; then the medians of [1, 5] and [5, 5] (upper middle) are 5
    assert spike_count([1.0, 1.0, 5.0, 5.0, 5.0], window=2, factor=1.2) == 1
    assert spike_count([1.0, 1.0], window=2) == 0
    assert spike_count([1.0] * 10 + [1.3], window=10) == 1  # defaults: window 10, factor 1.2
    assert spike_count([1.0] * 10 + [1.2], window=10) == 0
