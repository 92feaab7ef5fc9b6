#!/usr/bin/env python
"""Regenerate README.md's config reference (between the config-reference markers) from the schema."""

from pathlib import Path

from megatron_vpmoe.config.reference import reference_markdown
from megatron_vpmoe.utils.atomic import atomic_write_text

BEGIN, END = "<!-- config-reference:begin -->\n", "<!-- config-reference:end -->"


def main() -> int:
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: the markers {BEGIN.strip()} / {END} are missing")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    atomic_write_text(readme, head + BEGIN + reference_markdown() + END + tail)
    print(f"{readme}: config reference updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
