"""The gigatoken encoding engine behind a HF-backed tokenizer, used only where it reproduces the reference ids on a built-in sample.

``gigatoken`` (Rust, byte-level BPE from a ``tokenizer.json``) encodes several times faster
than HF ``tokenizers``. It is not assumed to agree: :func:`build_engine` loads it from the
reference tokenizer's own ``tokenizer.json`` text and compares ids on :data:`SAMPLE`
(multilingual text, code, emoji, U+FFFD from invalid UTF-8, long whitespace runs, special-token
strings, which both encode as their special ids); any difference, a load failure or a missing
library refuses the engine with a one-line reason, and the caller keeps the reference encoder.
The engine's encode caches are bounded (:data:`CACHE_BYTES` per worker) so memory does not grow
with the corpus.
"""

from __future__ import annotations

import json
import os
from typing import Callable, List, Optional, Sequence, Tuple

CACHE_BYTES = 64 << 20  # gigatoken's per-worker encode-cache budget (its default is 512 MiB)
DISABLE_ENV = "VPMOE_FAST_TOKENIZER"  # "0": never use the engine

SAMPLE: Tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it? I'll say \"yes\"!",
    "  leading spaces\n\n\n\ttabs\t\tand\r\nCRLF   trailing   ",
    " " * 300 + "x" + "\n" * 120 + "\t" * 40 + "y" + " \n" * 50,
    "héllo wörld — naïve café, Ærøskøbing, ÆØÅ, Straße, ﬁne ligature",
    "Спасибо большое! Ελληνικά κείμενα. עברית ועוד. العربية هنا. हिन्दी पाठ।",
    "日本語のテキストと中文文本、한국어 문장。「引用」（括弧）",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 🇫🇷 ❤️ 🤖🧠 and ZWJ\u200d joins",
    "def f(x: int) -> int:\n    return [i ** 2 for i in range(x)]  # 12345 67.89e-3\n\n\nclass A:\n\tpass\n",
    "{\"key\": [1, 2, 3], 'tab':\t\"v\"} <html><body>&amp;&lt;</body></html> SELECT * FROM t;",
    b"invalid \xff\xfe utf-8 \xc3( and \xe2\x82 truncated".decode("utf-8", errors="replace"),
    "\x00\x01 control \x7f bytes \u2581 marks \u00a0nbsp\u2028line\u2029para",
    "Numbers 0 1 12 123 1234 12345 123456 1,234,567.89 +33 (0)6 12 34 56 78",
    "",
    " ",
    "\n",
)


class FastEngine:
    """Encodes batches with gigatoken (checked by :func:`build_engine` to give the reference ids)."""

    def __init__(self, gigatoken_tokenizer):
        self._gt = gigatoken_tokenizer

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        # parallel=None: gigatoken's thread pool in a single process, the calling thread in a
        # (forked) worker process, where workers already use the cores
        return self._gt.encode_batch_list(texts)


def build_engine(tokenizer_json: str, reference_batch: Callable[[List[str]], List[List[int]]],
                 extra_texts: Sequence[str] = ()) -> Tuple[Optional[FastEngine], str]:
    """``(engine, "")`` when gigatoken built from ``tokenizer_json`` gives ``reference_batch``'s ids
    on every :data:`SAMPLE` text (and ``extra_texts``), else ``(None, reason)``."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None, f"{DISABLE_ENV}=0"
    try:
        import gigatoken
    except ImportError:
        return None, "gigatoken is not installed (pip install gigatoken-cachefix)"
    try:
        if gigatoken.get_max_cache_bytes() != CACHE_BYTES:
            gigatoken.set_max_cache_bytes(CACHE_BYTES)  # applies to tokenizers built afterwards
        candidate = gigatoken.Tokenizer.from_json(tokenizer_json)
    except Exception as err:  # noqa: BLE001 - a format gigatoken cannot load: keep the reference
        return None, f"gigatoken cannot load this tokenizer.json ({str(err).splitlines()[0]})"
    texts = list(SAMPLE) + list(extra_texts)
    try:
        specials = json.loads(tokenizer_json).get("added_tokens") or []
    except ValueError:
        specials = []
    # every special-token string inside text, and all of them in one text
    texts += [f"a {t['content']} b" for t in specials] + ["".join(t["content"] for t in specials)]
    expected = reference_batch(texts)
    try:
        # parallel=False: no thread pool is started in a process that may fork workers next
        got = candidate.encode_batch_list(texts, parallel=False)
    except Exception as err:  # noqa: BLE001
        return None, f"gigatoken failed on the sample ({str(err).splitlines()[0]})"
    for i, (want, have) in enumerate(zip(expected, got)):
        if list(want) != list(have):
            at = next((j for j, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
            return None, (f"ids differ from the reference on sample text {i} ({texts[i][:24]!r}...) at token "
                          f"{at} ({len(want)} vs {len(have)} tokens)")
    return FastEngine(candidate), ""
