"""Shared fixtures: the data folder (../shared/data or the embedded default), skips for absent
files (helpers/needs.py), offline tokenizer env, small CPU defaults."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers.paths import ROOT  # tests/ is on sys.path (pytest.ini's pythonpath)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers.needs import need_data, need_o200k  # noqa: E402
from megatron_vpmoe.utils.paths import checkout_shared  # noqa: E402

pytest_plugins = ["helpers.fake_world"]  # fixtures shared by test modules in different folders

SHARED = checkout_shared()  # ../shared beside the checkout; None in a clone elsewhere

# The teacher tokenizer's ranks load offline from ../shared/tokenizers when it is there.
if SHARED is not None and (SHARED / "tokenizers").is_dir():
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(SHARED / "tokenizers"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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


def pytest_collection_modifyitems(config, items):
    """The layout's two rules: every module under tests/e2e/ carries the ``e2e`` marker, and no test
    folder is a package (an ``__init__.py`` in tests/tokenizers/ would shadow Hugging Face's
    ``tokenizers``: test modules import by their unique basenames instead)."""
    tests = ROOT / "tests"
    packages = sorted(str(p.relative_to(ROOT)) for p in tests.glob("*/__init__.py") if p.parent.name != "helpers")
    if packages:
        raise pytest.UsageError(f"test folders must not be packages (they would shadow real ones): {packages}")
    unmarked = sorted({str(item.path.relative_to(ROOT)) for item in items
                       if tests / "e2e" in item.path.parents and item.get_closest_marker("e2e") is None})
    if unmarked:
        raise pytest.UsageError(f"add `pytestmark = pytest.mark.e2e` to {', '.join(unmarked)}")
