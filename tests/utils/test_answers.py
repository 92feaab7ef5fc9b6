"""One answer rule (:mod:`megatron_vpmoe.utils.answers`): the on-policy ``verify`` reward and the GSM8K
exact-match metric score the same completions the same way."""

from __future__ import annotations

import asyncio
import json

import pytest

from megatron_vpmoe.inference.backend import Backend, truncate_at_stop
from megatron_vpmoe.utils.answers import answer_matches, canonical_number, predicted_answer, reference_answer

QUESTION = {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
            "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"}

# (completion, is it right): restated work on the answer line, text after the answer line, a
# corrected marker, the fallbacks without a marker, and completions with no usable answer
CASES = [
    (" 48 + 24 = 72 clips.\n#### 72", True),
    (" #### 48 + 24 = 72", True),  # the result is written last on the answer line
    (" #### <<48+24=72>>72", True),
    (" #### 72\nCheck: 72 - 24 = 48", True),  # the answer line, not the last number of the text
    (" #### 70\nNo, recount.\n#### 72", True),  # the last marker counts
    (" The answer is $72.00.", True),
    (" \\boxed{72}, not 71", True),
    (" So 72 clips, or maybe 73", False),  # no marker: the last number
    (" #### seventy-two", False),
    (" #### 72 - 24 = 48", False),
]


class Scripted(Backend):
    """Bytes as tokens; every prompt is completed with ``self.completion``."""

    max_length = 4096

    def __init__(self, completion: str):
        self.completion = completion

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode()

    @property
    def prefix_token_id(self):
        return 0

    def generate(self, prompts, params, cancelled=None):
        return [truncate_at_stop(self.encode(self.completion), [], set(), params.max_new_tokens) for _ in prompts]


@pytest.mark.parametrize("completion,right", CASES)
def test_reward_and_metric_agree(tmp_path, completion, right):
    from megatron_vpmoe.distill.prompts import load_prompts
    from megatron_vpmoe.distill.scorers import score_verify
    from megatron_vpmoe.eval.tasks import run_gsm8k

    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(QUESTION) + "\n")
    (prompt,) = load_prompts([str(path)])
    (reward,) = asyncio.run(score_verify(None, prompt.messages, prompt.reference, [completion]))
    metric = run_gsm8k(Scripted(completion), path, None, shots=0, max_new_tokens=256)["exact_match"]
    assert reward == metric == float(right)


def test_the_rule():
    assert reference_answer("48/2 = 24\n#### 72") == "72" and reference_answer("no marker 5") is None
    assert reference_answer("#### 1,200") == "1200"
    assert predicted_answer("so 3 + 4 = 7.\n#### 1,200") == "1200"
    assert predicted_answer("It costs $18.00 in total") == "18"
    assert predicted_answer("-3.5 degrees") == "-3.5" and predicted_answer("no idea") is None
    assert predicted_answer("####\n\n 42 apples") == "42"  # the first non-empty line after the marker
    assert canonical_number("0.50") == "0.5" and canonical_number("1234.5678") == "1234.5678"
    assert answer_matches("The answer is 72.", "72") and not answer_matches("It is 71", "72")
