"""Chat prompts in and channel-split answers out, for the server's ``/v1/chat/completions``.

Harmony models (tokenizers that hold the Harmony special tokens) get their prompt rendered by
``openai_harmony`` (the reference renderer of GPT-OSS's format) as text, which the served
model's own tokenizer then encodes; their output is parsed back into the ``analysis``
(reasoning) and ``final`` channels by the same library. Other models use their tokenizer's
chat template.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from megatron_vpmoe.utils.errors import InputError

HARMONY_SPECIALS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>")
HARMONY_STOPS = ("<|return|>", "<|call|>")


@functools.lru_cache(maxsize=1)
def _harmony():
    import openai_harmony as oh

    return oh, oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def render_harmony_prompt(messages: list[dict]) -> str:
    """Messages (OpenAI chat format) -> Harmony prompt text ending in ``<|start|>assistant``.

    A leading ``system`` message becomes the developer instructions, as GPT-OSS serving does.
    Assistant messages may carry ``reasoning_content`` or ``thinking`` (the analysis channel).
    """
    oh, enc = _harmony()
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new())]
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or not isinstance(msg.get("content", ""), str):
            raise InputError(f"messages[{i}] must be an object with 'role' and string 'content'")
        role, content = msg["role"], msg.get("content") or ""
        if role in ("system", "developer"):
            out.append(oh.Message.from_role_and_content(
                oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(content)))
        elif role == "user":
            out.append(oh.Message.from_role_and_content(oh.Role.USER, content))
        elif role == "assistant":
            reasoning = msg.get("reasoning_content") or msg.get("thinking")
            if reasoning:
                out.append(oh.Message.from_role_and_content(
                    oh.Role.ASSISTANT, reasoning).with_channel("analysis"))
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel("final"))
        else:
            raise InputError(f"messages[{i}]: unsupported role {role!r}")
    conv = oh.Conversation.from_messages(out)
    return enc.decode_utf8(enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT))


@dataclass
class ChannelSplit:
    reasoning: Optional[str]
    final: str
    parsed: bool  # False: the text was not well-formed Harmony; ``final`` is the raw text


def parse_harmony_completion(text: str) -> ChannelSplit:
    """Completion text after ``<|start|>assistant`` -> reasoning (analysis) and final channels."""
    oh, enc = _harmony()
    body = text
    for stop in HARMONY_STOPS:  # the stop token may or may not have been kept
        body = body.split(stop)[0]
    try:
        ids = enc.encode(body + "<|end|>", allowed_special="all")
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
