"""Pinning tests for the report's sequence-length inflation (direction) and its mean ± std cells (seed counts)."""

from megatron_vpmoe.experiments.report import _cell, aggregate


def _row(variant, seed, bytes_per_token, reference=False):
    return {"variant": variant, "seed": seed, "reference": reference, "bytes_per_token": bytes_per_token,
            "flops": 100.0, "flops_per_token": 1.0, "vocab_size": 10, "documents_sha256": "d",
            "curve": [{"flops": 0.0, "bits_per_byte_smoothed": 2.0}, {"flops": 100.0, "bits_per_byte_smoothed": 1.0}],
            "scores": {}}


def test_inflation_is_reference_bytes_per_token_over_the_variants():
    # a variant whose tokens carry 5 bytes needs 4/5 as many tokens as the 4-byte reference
    rows = [_row("small", 1, 5.0), _row("ref", 1, 4.0, reference=True)]
    agg = aggregate(rows)
    assert agg["reference"] == "ref"
    assert agg["variants"]["small"]["metrics"]["sequence_length_inflation"]["mean"] == 0.8
    assert agg["variants"]["ref"]["metrics"]["sequence_length_inflation"]["mean"] == 1.0


def test_cell_shows_the_spread_from_two_seeds_on():
    assert _cell({"mean": 1.23456, "std": 0.0, "n": 1}, "valid_bpb", 3) == "1.235"
    assert _cell({"mean": 1.23456, "std": 0.01, "n": 2}, "valid_bpb", 3) == "1.235 ± 0.010"
    assert _cell({"mean": 2.5e6, "std": 5e5, "n": 3}, "bytes_seen", 2) == "2.50 ± 0.50"  # MB
    assert _cell({"mean": None, "std": None, "n": 0}, "valid_bpb", 3) == "-"
