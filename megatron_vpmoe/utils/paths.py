"""Where the data and the teacher's o200k ranks come from: one lookup for every command and test.

Data (``data_dir``): ``--data DIR``, else ``$VPMOE_DATA``, else ``../shared/data`` beside a
checkout when present, else the small default embedded in the package
(``megatron_vpmoe/data/default/``, see its ``SOURCES.md``). Every source has the same layout
(``corpora/``, ``kd/``, ``eval/``, ``eval/mc/``). The o200k ranks (``o200k_ranks_file``):
``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken``, else ``../shared/tokenizers`` beside a checkout
when present, else None (tiktoken's own cache, or its download).

``python -m megatron_vpmoe.utils.paths [--data DIR]`` prints the data folder (the quickstart uses it).
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
from pathlib import Path
from typing import Optional

from megatron_vpmoe.utils.errors import InputError

RANKS_FILE = "o200k_base.tiktoken"


def embedded_data_dir() -> Path:
    """The default data shipped inside the package (an installed wheel has it too)."""
    return Path(str(importlib.resources.files("megatron_vpmoe.data") / "default"))


def checkout_shared() -> Optional[Path]:
    """``../shared`` beside the checkout this package runs from, if both exist (an installed
    package has no checkout, so none)."""
    root = Path(__file__).resolve().parents[2]
    shared = root.parent / "shared"
    return shared if (root / "setup.py").is_file() and shared.is_dir() else None


def data_dir(explicit: Optional[str] = None) -> Path:
    """The data folder: ``explicit`` (``--data``), ``$VPMOE_DATA``, ``../shared/data``, the embedded
    default, in that order. A given folder that does not exist is an :class:`InputError`."""
    for source, value in (("--data", explicit), ("VPMOE_DATA", os.environ.get("VPMOE_DATA"))):
        if value:
            path = Path(value).expanduser()
            if not path.is_dir():
                raise InputError(f"{source}={value}: no such data folder")
            return path
    shared = checkout_shared()
    if shared is not None and (shared / "data").is_dir():
        return shared / "data"
    return embedded_data_dir()


def o200k_ranks_file() -> Optional[Path]:
    """The local ``o200k_base.tiktoken``: in ``$TIKTOKEN_ENCODINGS_BASE`` when set (even if absent
    there: the caller then names the missing file), else in ``../shared/tokenizers`` when present;
    None means tiktoken's own cache or download."""
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base:
        return Path(base) / RANKS_FILE
    shared = checkout_shared()
    if shared is not None and (shared / "tokenizers" / RANKS_FILE).is_file():
        return shared / "tokenizers" / RANKS_FILE
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_vpmoe.utils.paths", description="print the data folder")
    parser.add_argument("--data", default=None, metavar="DIR", help="use DIR (default: $VPMOE_DATA, ../shared/data, "
                                                                      "the embedded default)")
    args = parser.parse_args(argv)
    try:
        print(data_dir(args.data))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
