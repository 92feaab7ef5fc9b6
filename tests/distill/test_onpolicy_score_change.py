"""The on-policy summary compares the teacher's score over the same prompts (first vs last pass), not one step's prompts against another's."""

import pytest

from megatron_vpmoe.distill.onpolicy import score_change


def _history(scores, start=1):
    return [{"step": start + i, "teacher_score": s} for i, s in enumerate(scores)]


def test_quickstart_shape_compares_the_first_and_last_pass_over_the_same_prompts():
    # 4 prompts, 2 a step: steps 1-2 read prompts 0-3, steps 5-6 read them again. The second step's
    # prompts are harder; the policy gains a little each pass, yet step 6 scores below step 1
    scores = [-5.4555, -6.0, -5.4, -5.95, -5.35, -5.9577]
    before, after, how = score_change(_history(scores), n_prompts=4, prompts_per_step=2)
    assert scores[-1] < scores[0]  # first step vs last step: "lowered the teacher's score"
    assert before == pytest.approx((scores[0] + scores[1]) / 2) and after == pytest.approx((scores[4] + scores[5]) / 2)
    assert after > before and "same 4 prompts" in how


def test_without_a_repeat_the_summary_says_the_prompts_differ():
    before, after, how = score_change(_history([-5.1, -4.9, -5.3]), n_prompts=300, prompts_per_step=2)
    assert (before, after) == (-5.1, -5.3) and "not comparable" in how
    # a resumed run (starting at step 7) still compares whole passes
    before, after, _ = score_change(_history([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0], start=7), n_prompts=6,
                                    prompts_per_step=2)
    assert (before, after) == (pytest.approx(-2.0), pytest.approx(1.0))
