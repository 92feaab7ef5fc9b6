"""Verifiable answers: the reference number of a GSM8K-style record and the one a model gave.

Used for rejection sampling of teacher outputs (phase 1) and for the verifiable reward of
on-policy distillation (phase 2). Numbers are compared after dropping ``$``, ``,`` and
trailing zeros, so ``"$1,200.00"`` equals ``"1200"``.
"""

from __future__ import annotations

import re
from typing import Optional

_NUM = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)


def canonical_number(text: str) -> Optional[str]:
    """The first number in ``text`` in canonical form, or None."""
    match = _NUM.search(text.replace("$", ""))
    if not match:
        return None
    raw = match.group(0).replace(",", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else f"{value:g}"


def reference_answer(answer: str) -> Optional[str]:
    """GSM8K's ``... #### 72`` -> ``"72"``; None when the text has no ``####`` marker."""
    if "####" not in answer:
        return None
    return canonical_number(answer.rsplit("####", 1)[1])


def predicted_answer(text: str) -> Optional[str]:
    """The answer a completion commits to: ``#### N``, then ``\\boxed{N}``, then "the answer
    is N", then the last number in the text."""
    if "####" in text:
        got = canonical_number(text.rsplit("####", 1)[1])
        if got is not None:
            return got
    for pattern in (_BOXED, _ANSWER_IS):
        found = pattern.findall(text)
        if found:
            got = canonical_number(found[-1])
            if got is not None:
                return got
    numbers = _NUM.findall(text.replace("$", ""))
    return canonical_number(numbers[-1]) if numbers else None


def answer_matches(text: str, reference: str) -> bool:
    return predicted_answer(text) == canonical_number(reference)
