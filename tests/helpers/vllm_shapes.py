"""vLLM's OpenAI-server protocol shapes (tests/fixtures/vllm_openai_shapes.json) and a comparer."""

from __future__ import annotations

import json

from helpers.paths import FIXTURES

SHAPES = json.loads((FIXTURES / "vllm_openai_shapes.json").read_text())
JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", list: "array", dict: "object",
              type(None): "null"}


def shape_mismatches(ours, theirs, where="") -> list:
    """Keys of ``ours`` that a vLLM answer of the same kind lacks, and JSON type clashes (null is
    compatible with anything)."""
    out = []
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key, value in ours.items():
            if key not in theirs:
                out.append(f"{where}.{key}: not in vLLM's answer")
            else:
                out += shape_mismatches(value, theirs[key], f"{where}.{key}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        if ours and theirs:
            out += shape_mismatches(ours[0], theirs[-1], f"{where}[]")
    elif ours is not None and theirs is not None and JSON_TYPES[type(ours)] != JSON_TYPES[type(theirs)]:
        if {JSON_TYPES[type(ours)], JSON_TYPES[type(theirs)]} != {"integer", "number"}:
            out.append(f"{where}: {JSON_TYPES[type(ours)]} here, {JSON_TYPES[type(theirs)]} in vLLM's answer")
    return out
