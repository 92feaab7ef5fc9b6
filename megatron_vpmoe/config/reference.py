"""The config reference: every key of the schema with its type, default, allowed range and meaning.

Generated from the dataclasses in ``schema.py`` (types and defaults from the fields, meanings
from each field's trailing ``# comment``), so the table in the README cannot drift from the
code: ``vpmoe config reference`` prints it and a test compares it with the README.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Dict, Iterator, List, Tuple

from megatron_vpmoe.config import schema
from megatron_vpmoe.config.ranges import RANGES

_FIELD_COMMENT = re.compile(r"^\s+([a-z_0-9]+):[^#]*#\s*(.+)$")


def _comments(cls) -> Dict[str, str]:
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = _FIELD_COMMENT.match(line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return _type_name(rest[0]) + " or null"
    if origin in (list, List):
        return f"list[{_type_name(args[0])}]" if args else "list"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return ""
    if dataclasses.is_dataclass(value):
        return ""
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return "[" + ", ".join(str(dataclasses.asdict(v)) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def iter_keys(cls=schema.VpmoeConfig, prefix: str = "") -> Iterator[Tuple[str, str, str, str]]:
    """(dotted key, type, default, meaning) for every leaf key, nested sections expanded."""
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, key + ".")
            continue
        yield key, _type_name(tp), _default(f), comments.get(f.name, "")


def reference_markdown() -> str:
    """One Markdown table per top-level section (numeric keys show their range from ``ranges.py``)."""
    parts: List[str] = []
    section = None
    for key, tp, default, meaning in iter_keys():
        top = key.split(".")[0]
        if top != section:
            section = top
            doc = inspect.getdoc(typing.get_type_hints(schema.VpmoeConfig)[top]) or ""
            parts.append(f"\n**`{top}`** — {doc.splitlines()[0] if doc else ''}\n")
            parts.append("| key | type | default | range | meaning |\n|---|---|---|---|---|")
        default_cell = f"`{default}`" if default else ""
        allowed = RANGES.get(key)
        range_cell = f"{allowed}".replace("|", "\\|") if allowed else ""
        parts.append(f"| `{key}` | {tp} | {default_cell} | {range_cell} | {meaning} |")
    return "\n".join(parts).strip() + "\n"
