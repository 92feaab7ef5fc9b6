"""Harmony as Hugging Face tokenizer templates, so third-party servers render and split GPT-OSS chats.

A model directory served by ``transformers serve`` (or anything that calls
``tokenizer.apply_chat_template`` / ``tokenizer.parse_response``) needs its chat format in the
tokenizer files. :func:`harmony_chat_template` is a Jinja chat template whose output equals
``openai_harmony``'s own rendering (:func:`megatron_vpmoe.data.chat.render_prompt` and
``render_conversation``: earlier reasoning is dropped from a prompt, kept in a training text)
for system/developer/user/assistant chats; its fixed system message is
taken from that renderer, not written here. :data:`HARMONY_RESPONSE_TEMPLATE` is a
``transformers`` response template that returns the ``analysis`` channel as
``reasoning_content`` and the ``final`` channel as ``content``, as vLLM does for GPT-OSS.
"""

from __future__ import annotations

import json

from megatron_vpmoe.data.chat import render_prompt

_PROBE = "\u0000user-probe\u0000"

# messages -> Harmony text; {SYSTEM} is openai_harmony's system message (filled in below)
_TEMPLATE = (
    "{{- SYSTEM -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' or m.role == 'developer' -%}"
    "{{- '<|start|>developer<|message|># Instructions\\n\\n' + m.content + '<|end|>' -}}"
    "{%- elif m.role == 'user' -%}"
    "{{- '<|start|>user<|message|>' + m.content + '<|end|>' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- set reasoning = m.thinking or m.reasoning_content or m.reasoning or m.analysis or '' -%}"
    "{%- if reasoning and not add_generation_prompt -%}"
    "{{- '<|start|>assistant<|channel|>analysis<|message|>' + reasoning + '<|end|>' -}}"
    "{%- endif -%}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + (m.content or '') -}}"
    "{{- '<|return|>' if loop.last and not add_generation_prompt else '<|end|>' -}}"
    "{%- else -%}"
    "{{- raise_exception('Harmony chat: unsupported role ' + m.role) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}"
)

# completion text after "<|start|>assistant" -> {reasoning_content, content}
HARMONY_RESPONSE_TEMPLATE = {
    "version": 1,
    "defaults": {"role": "assistant"},
    "start_anchor": "<|start|>assistant",
    "fields": {
        "reasoning_content": {"open": "<|channel|>analysis<|message|>",
                              "close_pattern": r"<\|end\|>|<\|return\|>|<\|call\|>", "content": "text",
                              "content_args": {"strip": False}},  # the channel text exactly, as openai_harmony
        "content": {"open_pattern": r"(?:<\|start\|>assistant)?<\|channel\|>final<\|message\|>",
                    "close_pattern": r"<\|return\|>|<\|end\|>|<\|call\|>", "content": "text",
                    "content_args": {"strip": False}},
    },
}


def harmony_system_text() -> str:
    """The system message ``openai_harmony`` renders for a chat (``<|start|>system...<|end|>``)."""
    text = render_prompt([{"role": "user", "content": _PROBE}])
    return text[: text.index("<|start|>user<|message|>" + _PROBE)]


def harmony_chat_template() -> str:
    """A Jinja chat template rendering chats as ``openai_harmony`` does (module docstring)."""
    return _TEMPLATE.replace("{{- SYSTEM -}}", "{{- " + json.dumps(harmony_system_text()) + " -}}")
