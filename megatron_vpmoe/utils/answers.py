"""The one rule for verifiable answers: a GSM8K reference's number and the number a completion commits to.

Used by teacher rejection sampling and the on-policy ``verify`` reward (:mod:`megatron_vpmoe.distill`)
and by the GSM8K exact-match metric (:mod:`megatron_vpmoe.eval.tasks`), so a completion the reward
counts as right is right for the metric too.

The rule. A completion commits to the number after its **last** ``####`` marker (a completion that
writes the marker twice corrected itself, and GSM8K references end with exactly one ``#### N``), read
from the first non-empty line after the marker, taking that line's **last** number: a reference's
line holds one number, so first and last agree there, while a completion that restates its work on
the answer line (``#### 5 + 13 = 18``, ``#### <<5+13=18>>18``) writes the result last. Without a
marker: ``\\boxed{N}``, then "the answer is N", then the last number of the text. Numbers compare in
canonical form: ``$`` and thousands commas dropped, trailing zeros of the fraction dropped
(``"$1,200.00"`` is ``"1200"``).
"""

from __future__ import annotations

import re
from typing import Optional

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
MARKER = "####"


def _numbers(text: str) -> list:
    return _NUMBER.findall(text.replace("$", ""))


def canonical_number(text: str) -> Optional[str]:
    """The last number in ``text`` in canonical form (``"$1,200.00"`` -> ``"1200"``), or None."""
    found = _numbers(text)
    if not found:
        return None
    value = float(found[-1].replace(",", ""))
    return str(int(value)) if value.is_integer() else repr(value)


def _after_marker(text: str) -> Optional[str]:
    """The number on the first non-empty line after the last ``####``, or None."""
    tail = text.rsplit(MARKER, 1)[1]
    line = next((ln for ln in tail.splitlines() if ln.strip()), "")
    return canonical_number(line)


def reference_answer(answer: str) -> Optional[str]:
    """GSM8K's ``... #### 72`` -> ``"72"``; None when the text has no ``####`` marker."""
    return _after_marker(answer) if MARKER in answer else None


def predicted_answer(text: str) -> Optional[str]:
    """The number a completion commits to (the module's rule), or None."""
    if MARKER in text:
        got = _after_marker(text)
        if got is not None:
            return got
    for pattern in (_BOXED, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            got = canonical_number(found[-1])
            if got is not None:
                return got
    return canonical_number(text)


def answer_matches(text: str, reference: str) -> bool:
    """Whether completion ``text`` commits to ``reference`` (a number, compared canonically)."""
    return predicted_answer(text) == canonical_number(reference)
