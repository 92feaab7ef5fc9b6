"""Chat prompts in and channel-split answers out (the server's ``/v1/chat/completions``, on-policy rollouts, toy teachers).

Harmony models (tokenizers that hold the Harmony special tokens) get their prompt rendered by
``openai_harmony`` (the reference renderer of GPT-OSS's format) as text, which the served
model's own tokenizer then encodes; their output is parsed back into the ``analysis``
(reasoning) and ``final`` channels by the same library. Other models use their tokenizer's
chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_vpmoe.data.chat import _harmony, render_prompt
from megatron_vpmoe.tokenizers.specials import HARMONY_MARKERS as HARMONY_SPECIALS
from megatron_vpmoe.tokenizers.specials import HARMONY_STOPS


def render_harmony_prompt(messages: list[dict]) -> str:
    """Messages (OpenAI chat format) -> Harmony prompt text ending in ``<|start|>assistant``
    (the one renderer, :func:`megatron_vpmoe.data.chat.render_prompt`, that training data uses too)."""
    return render_prompt(messages)


@dataclass
class ChannelSplit:
    reasoning: Optional[str]
    final: str
    parsed: bool  # False: the text was not well-formed Harmony; ``final`` is the raw text


def parse_harmony_completion(text: str) -> ChannelSplit:
    """Completion text after ``<|start|>assistant`` -> reasoning (analysis) and final channels."""
    oh, enc = _harmony()
    body = text
    # the stop token may or may not have been kept; <|return|>/<|call|> close a message, as
    # openai_harmony parses them (a message may follow one: parse everything)
    closed = body.endswith(("<|end|>",) + HARMONY_STOPS)
    try:
        ids = enc.encode(body if closed else body + "<|end|>", allowed_special="all")
        messages = enc.parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT)
    except Exception:  # noqa: BLE001 - any parse failure means "not Harmony"
        return ChannelSplit(None, _strip_specials(body), False)
    reasoning, final = [], []
    for m in messages:
        part = "".join(c.text for c in m.content if hasattr(c, "text"))
        (final if m.channel == "final" else reasoning).append(part)
    if not final and not reasoning:
        return ChannelSplit(None, _strip_specials(body), False)
    return ChannelSplit("\n".join(reasoning) if reasoning else None, "\n".join(final), True)


def _strip_specials(text: str) -> str:
    for tok in HARMONY_SPECIALS + HARMONY_STOPS:
        text = text.replace(tok, "")
    return text
