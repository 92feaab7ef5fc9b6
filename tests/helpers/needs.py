"""Skips for absent inputs: the data folder's files (need_data) and the o200k ranks (need_o200k)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_vpmoe.utils.paths import data_dir, o200k_ranks_file


def need_data(*relative: str) -> Path:
    """The data folder (``data_dir()``), skipping the test when any of ``relative`` is absent
    there (the embedded default holds only a slice: Shakespeare, 300 GSM8K problems, a few MC sets)."""
    root = data_dir()
    missing = [r for r in relative if not (root / r).exists()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} under {root} (set VPMOE_DATA to the full data)")
    return root


def need_o200k() -> Path:
    """The local ``o200k_base.tiktoken``, skipping the test without one (tests never download)."""
    path = o200k_ranks_file()
    if path is None or not path.is_file():
        pytest.skip("needs o200k_base.tiktoken (set TIKTOKEN_ENCODINGS_BASE to the folder holding it)")
    return path
