"""Pinning test for the report's verdict direction: lower-is-better metrics vs higher-is-better scores."""

from megatron_vpmoe.experiments.report import aggregate


def _row(variant, seed, valid, evalb, score, reference=False):
    return {"variant": variant, "seed": seed, "reference": reference, "bytes_per_token": 4.0, "flops": 100.0,
            "flops_per_token": 1.0, "vocab_size": 10, "documents_sha256": "d",
            "curve": [{"flops": 0.0, "bits_per_byte_smoothed": 2.0}, {"flops": 100.0, "bits_per_byte_smoothed": 1.0}],
            "scores": {"qa": score}, "valid_bpb": valid, "eval_bpb": evalb}


def test_verdicts_follow_each_metrics_direction():
    rows = [_row("ref", 1, 1.00, 1.00, 0.50, True), _row("ref", 2, 1.02, 1.02, 0.52, True),
            _row("b", 1, 0.80, 1.50, 0.70), _row("b", 2, 0.82, 1.52, 0.72)]
    verdicts = {c["metric"]: c["verdict"] for c in aggregate(rows)["comparisons"] if c["variant"] == "b"}
    assert verdicts["valid_bpb"] == "better"  # lower bpb (-0.2, spread 0.0141)
    assert verdicts["eval_bpb"] == "worse"  # higher bpb (+0.5)
    assert verdicts["score_qa"] == "better"  # higher score (+0.2)
    assert verdicts["train_bpb_at_flops"] == "not distinguishable"  # the same curve
