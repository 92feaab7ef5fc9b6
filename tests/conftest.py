"""Shared fixtures: the data folder (../shared/data or the embedded default), skips for absent
files, offline tokenizer env, small CPU defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron_vpmoe.utils.paths import checkout_shared, data_dir, o200k_ranks_file  # noqa: E402

SHARED = checkout_shared()  # ../shared beside the checkout; None in a clone elsewhere

# The teacher tokenizer's ranks load offline from ../shared/tokenizers when it is there.
if SHARED is not None and (SHARED / "tokenizers").is_dir():
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(SHARED / "tokenizers"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The data folder: ../shared/data beside the checkout, $VPMOE_DATA, or the embedded default
    (which has corpora/tinyshakespeare.txt, kd/gsm8k_train.jsonl, eval/gsm8k_test.jsonl and
    eval/mc/{copa,piqa,openbook_qa,lambada_openai}.jsonl); other files: :func:`need_data`."""
    return need_data()


@pytest.fixture(scope="session")
def o200k() -> Path:
    return need_o200k()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
