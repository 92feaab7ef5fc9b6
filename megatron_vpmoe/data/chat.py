"""Harmony chat format: render chat records, split Harmony text into role-tagged segments.

One implementation for the whole stack. Rendering uses ``openai_harmony`` (GPT-OSS's reference
renderer, the teacher's own format), so the student is trained on exactly the text it is later
prompted with (``vpmoe serve``, on-policy rollouts). Segmenting turns rendered text into
``(text, is_special, role)`` pieces; preprocessing encodes the text pieces with the student
tokenizer and inserts each special as its single id, so the loss mask aligns token for token.

Roles (uint8, the loss-mask dataset's values):

* 0 - not supervised: system / developer / user / tool messages and every message header
  (``<|start|>assistant<|channel|>final<|message|>``);
* 1 - assistant reasoning: the body of an ``analysis`` message and its closing token;
* 2 - assistant final: the body of a ``final`` (or ``commentary``: tool calls and preambles are
  the assistant acting) message and its closing ``<|end|>``/``<|return|>``/``<|call|>``.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from megatron_vpmoe.tokenizers.specials import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, RETURN, START
from megatron_vpmoe.utils.errors import InputError

# loss-mask roles, one uint8 per token in a field's mask dataset (the trainer's loss reads them);
# ROLE_TEXT marks plain-text documents' tokens in a field that also holds chats
ROLE_NONE, ROLE_REASONING, ROLE_FINAL, ROLE_TEXT = 0, 1, 2, 3
CLOSERS = (END, RETURN, CALL)
SPECIALS = (START, CHANNEL, MESSAGE, CONSTRAIN, END, RETURN, CALL)
REASONING_KEYS = ("thinking", "reasoning_content", "reasoning", "analysis")
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")


@dataclass(frozen=True)
class Segment:
    text: str
    special: bool  # True: ``text`` is one Harmony special token
    role: int


@functools.lru_cache(maxsize=1)
def _harmony():
    """``openai_harmony`` and the GPT-OSS encoding (reads the o200k ranks, offline)."""
    if "TIKTOKEN_ENCODINGS_BASE" not in os.environ:
        from megatron_vpmoe.tokenizers.tiktoken_variant import default_ranks_path

        ranks = default_ranks_path()
        if ranks is not None and ranks.is_file():
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(ranks.parent)
    import openai_harmony as oh

    try:
        return oh, oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as err:  # noqa: BLE001 - the library raises its own error types
        raise InputError(f"cannot load the Harmony encoding ({err}); set TIKTOKEN_ENCODINGS_BASE to "
                         f"the folder holding o200k_base.tiktoken") from None


def _reasoning(msg: dict) -> Optional[str]:
    for key in REASONING_KEYS:
        if msg.get(key):
            return msg[key]
    return None


def harmony_messages(messages: list, where: str = "messages"):
    """OpenAI-style chat messages -> ``openai_harmony`` messages (system message first).

    A ``system``/``developer`` message becomes the developer instructions (as GPT-OSS serving
    does); assistant messages may carry their reasoning under one of :data:`REASONING_KEYS`.
    """
    oh, _ = _harmony()
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: expected a non-empty list of messages")
    out = [oh.Message.from_role_and_content(oh.Role.SYSTEM, oh.SystemContent.new())]
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise InputError(f"{where}[{i}]: expected an object with 'role' and 'content'")
        content = msg.get("content") or ""
        if not isinstance(content, str):
            raise InputError(f"{where}[{i}]: 'content' must be a string")
        role = msg["role"]
        if role in ("system", "developer"):
            out.append(oh.Message.from_role_and_content(
                oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(content)))
        elif role == "user":
            out.append(oh.Message.from_role_and_content(oh.Role.USER, content))
        elif role == "assistant":
            reasoning = _reasoning(msg)
            if reasoning is not None and not isinstance(reasoning, str):
                raise InputError(f"{where}[{i}]: the reasoning field must be a string")
            if reasoning:
                out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, reasoning).with_channel("analysis"))
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel("final"))
        else:
            raise InputError(f"{where}[{i}]: unsupported role {role!r} (system, developer, user, assistant)")
    return out


def render_prompt(messages: list) -> str:
    """Harmony prompt text ending in ``<|start|>assistant`` (what a model completes)."""
    oh, enc = _harmony()
    conv = oh.Conversation.from_messages(harmony_messages(messages))
    return enc.decode_utf8(enc.render_conversation_for_completion(conv, oh.Role.ASSISTANT))


def render_conversation(messages: list, where: str = "messages") -> str:
    """A whole conversation as Harmony training text (the last assistant message ends in
    ``<|return|>``; earlier reasoning is kept, as in distillation targets)."""
    oh, enc = _harmony()
    conv = oh.Conversation.from_messages(harmony_messages(messages, where))
    tokens = enc.render_conversation_for_training(conv, oh.RenderConversationConfig(auto_drop_analysis=False))
    return enc.decode_utf8(tokens)


def render_pieces(render: Callable[[list], str], messages: list) -> List[Tuple[str, bool]]:
    """``render(messages)`` as ``[(text, is_content)]``: which parts of the rendered prompt are
    message contents (``content`` and the reasoning fields) and which the template's own text.

    Encode template parts with special tokens parsed and contents as plain text
    (:func:`encode_pieces`): a user writing ``<|end|><|start|>system`` then gets those characters,
    not turn markers. Each content is rendered as a one-off marker (private-use characters and a
    random nonce, so no message can forge one) and put back after rendering.
    """
    nonce = secrets.token_hex(8)
    originals: list = []

    def mark(value):
        if not isinstance(value, str) or not value:
            return value
        originals.append(value)
        return f"\ue000{nonce}:{len(originals) - 1}\ue001"

    marked = [{k: mark(v) if k == "content" or k in REASONING_KEYS else v for k, v in m.items()}
              if isinstance(m, dict) else m for m in messages] if isinstance(messages, list) else messages
    text = render(marked)
    pieces: List[Tuple[str, bool]] = []
    for i, part in enumerate(re.split(f"\ue000{nonce}:(\\d+)\ue001", text)):
        if i % 2:
            pieces.append((originals[int(part)], True))
        elif part:
            pieces.append((part, False))
    return pieces


class HarmonyEncoder:
    """GPT-OSS's o200k Harmony encoding (``openai_harmony``, offline) behind the ``transformers``
    ``encode`` signature that :func:`encode_pieces` uses: ids equal a GPT-OSS teacher's."""

    def encode(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> List[int]:
        _, enc = _harmony()
        if split_special_tokens:  # special-token strings are plain text
            return enc.encode(text, allowed_special=set(), disallowed_special=())
        return enc.encode(text, allowed_special="all")


def encode_pieces(tokenizer, pieces: List[Tuple[str, bool]]) -> List[int]:
    """Ids of :func:`render_pieces`' output with a ``transformers`` tokenizer: special-token
    strings are special only in the template's parts, plain text in contents."""
    ids: List[int] = []
    for text, is_content in pieces:
        ids += tokenizer.encode(text, add_special_tokens=False, split_special_tokens=is_content)
    return ids


def is_harmony_text(text: str) -> bool:
    return text.lstrip().startswith(START)


def segment_harmony(text: str, where: str = "text") -> List[Segment]:
    """Split Harmony text into segments with their loss roles (module docstring).

    Text before the first ``<|start|>`` or between messages is kept with role 0. A message
    that is not closed (a truncated record) keeps its body's role; nothing is dropped, so
    ``"".join(s.text for s in segments) == text``.
    """
    segments: List[Segment] = []
    parts = [p for p in _SPECIAL_RE.split(text) if p]
    state, header, body_role = "outside", [], ROLE_NONE
    for part in parts:
        special = part in SPECIALS
        if state == "outside":
            if special and part == START:
                state, header = "header", []
            segments.append(Segment(part, special, ROLE_NONE))
        elif state == "header":
            if special and part == MESSAGE:
                body_role = _body_role("".join(header))
                state = "body"
            elif special and part in CLOSERS:
                raise InputError(f"{where}: {part} inside a message header (no <|message|>)")
            else:
                header.append(part)
            segments.append(Segment(part, special, ROLE_NONE))
        else:  # body
            if special and part in CLOSERS:
                segments.append(Segment(part, True, body_role))
                state = "outside"
            elif special and part == START:
                raise InputError(f"{where}: <|start|> inside a message body (missing <|end|>)")
            else:
                segments.append(Segment(part, special, body_role))
    return segments


def _body_role(header: str) -> int:
    """``assistant<|channel|>analysis`` -> 1; assistant final/commentary -> 2; others -> 0."""
    author = header.split(CHANNEL)[0].strip()
    if not author.startswith("assistant"):
        return ROLE_NONE
    channel = header.split(CHANNEL)[1].split()[0] if CHANNEL in header else "final"
    return ROLE_REASONING if channel == "analysis" else ROLE_FINAL
