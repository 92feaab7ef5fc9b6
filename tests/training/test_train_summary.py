"""The training summary's first/last loss and bits per byte are means over the first/last 10% of the steps, not single batches."""

import pytest

from megatron_vpmoe.training.summary import describe, smoothed_ends


def test_a_noisy_last_batch_does_not_decide_the_summary():
    # loss falls 8.32 -> 7.41 while one noisy last batch's bits/byte rises above the first: the case
    recs = [{"step": i, "loss": 8.32 - 0.01 * i, "bits_per_byte": 2.20 - 0.002 * i} for i in range(1, 92)]
    recs.append({"step": 92, "loss": 7.41, "bits_per_byte": 2.24})
    ends = smoothed_ends(recs)
    assert ends["first"]["steps"] == (1, 10) and ends["first"]["n"] == 10
    assert ends["last"]["steps"] == (83, 92)
    assert ends["first"]["loss"] == pytest.approx(sum(8.32 - 0.01 * i for i in range(1, 11)) / 10)
    assert ends["last"]["bits_per_byte"] < ends["first"]["bits_per_byte"]  # a single last batch said 2.24 > 2.20
    assert describe(ends["first"]).startswith("steps 1-10 (mean of 10) loss ")


def test_short_runs_and_missing_bits_per_byte():
    ends = smoothed_ends([{"step": 1, "loss": 3.0, "bits_per_byte": None}, {"step": 2, "loss": 2.0}])
    assert ends["first"] == {"steps": (1, 1), "n": 1, "loss": 3.0}
    assert describe(ends["last"]) == "step 2 loss 2.0000"
    assert smoothed_ends([]) == {"first": None, "last": None} and describe(None) == "n/a"
