"""The up-to-date check of ``vpmoe preprocess``: a fingerprint of inputs, tokenizers and flags.

A finished run stores :func:`fingerprint` and the size of every file it published in its
``{prefix}.summary.json``, written last. A re-run is "up to date" only when the summary is
there, the fingerprint is the same and every published file still has its recorded size
(:func:`stale_reason`); otherwise it rebuilds, and removes the old summary first, so a run
killed half way through publishing is never taken for a finished one.

Inputs are fingerprinted by (resolved path, size, mtime in ns), as make and rsync do: hashing
their content would re-read the whole corpus (often far larger than the tokenizer pass is
worth waiting for) on every re-run, while an edit, append, truncation or replacement changes
the size or the mtime (a bare ``touch`` rebuilds: the safe direction). Tokenizers are small,
so their directories are hashed by content (sha256 of every file's name and bytes): a tokenizer
retrained into the same directory rebuilds even if timestamps were preserved by a copy.
Flags that change the output bytes are part of it (``--json-keys``, ``--append-eod``,
``--txt-blocks``, ``--max-doc-bytes``); ``--workers``/``--partitions``/``--chunk-size`` are not
(the output is identical).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def inputs_digest(files: Sequence[Path]) -> str:
    stats = []
    for f in files:
        st = os.stat(f)
        stats.append([os.path.realpath(f), st.st_size, st.st_mtime_ns])
    return _digest(stats)


def directory_digest(directory: str) -> str:
    """sha256 over every file under ``directory`` (relative name and content), in name order."""
    root = Path(directory)
    h = hashlib.sha256()
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for path in paths:
        h.update(str(path.relative_to(root) if path != root else path.name).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def tokenizer_digests(tokenizers: Dict[str, str]) -> Dict[str, str]:
    """``{variant: digest of its tokenizer directory}``."""
    return {name: directory_digest(path) for name, path in sorted(tokenizers.items())}


def fingerprint(files: Sequence[Path], tokenizers: Dict[str, str], flags: dict) -> dict:
    """What a run's output depends on: digests of the inputs and of each tokenizer
    (:func:`tokenizer_digests`), and the flags."""
    return {"inputs": inputs_digest(files), "input_files": len(files), "tokenizers": dict(tokenizers),
            "flags": dict(flags)}


def published_sizes(prefixes: Iterable[str]) -> Dict[str, int]:
    """``{file name: size}`` of the ``.bin``/``.idx`` of each dataset prefix that exists."""
    out = {}
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            path = prefix + ext
            if os.path.isfile(path):
                out[os.path.basename(path)] = os.path.getsize(path)
    return out


def stale_reason(summary: Optional[dict], current: dict, folder: str, required: Iterable[str]) -> Optional[str]:
    """Why the outputs recorded in ``summary`` are not up to date for ``current`` (None: they
    are). ``required``: file names that must have been published; sizes are checked in ``folder``."""
    if summary is None:
        return "no summary of a finished run"
    old = summary.get("fingerprint")
    if not isinstance(old, dict):
        return "the summary has no fingerprint (written by an older version)"
    for part in ("inputs", "tokenizers", "flags"):
        if old.get(part) != current.get(part):
            return f"the {part} changed since the last run"
    sizes = summary.get("files") or {}
    for name in required:
        if name not in sizes:
            return f"{name} was not published by the last run"
    for name, size in sizes.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return f"{path} is missing or changed since the last run"
    return None


def read_summary(path: Path) -> Optional[dict]:
    """A summary file, or None when it is missing or unreadable (then the run rebuilds)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
