"""Input paths given on a command line (files, directories searched recursively, globs) -> files, in a stable order, each once."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import List, Sequence

from megatron_vpmoe.utils.errors import InputError

# plain UTF-8 text read whole: what a directory contributes to a text-only reader
PLAIN_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".rs", ".go", ".js", ".ts")


def has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def expand_inputs(patterns: Sequence[str], suffixes: Sequence[str], *, strict: bool = True) -> List[Path]:
    """Files of every pattern: a file itself, a directory's files (recursively) ending in one
    of ``suffixes``, or a glob's files. A pattern matching nothing is an :class:`InputError`;
    with ``strict`` so is a file (named or globbed) of another type."""
    supported = ", ".join(suffixes)
    files: List[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and has_suffix(q, suffixes))
            if not found:
                raise InputError(f"{pattern}: directory has no input files (supported: {supported})")
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(q) for q in glob.glob(pattern, recursive=True) if Path(q).is_file())
            if not found:
                raise InputError(f"{pattern}: no input files (no such file or directory, or the glob matches none)")
        if strict:
            for f in found:
                if not has_suffix(f, suffixes):
                    raise InputError(f"{f}: unsupported input type (supported: {supported})")
        files.extend(found)
    seen, unique = set(), []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique
