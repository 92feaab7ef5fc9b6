"""utils/paths.py: the data folder's precedence (--data, VPMOE_DATA, ../shared/data, the embedded
default), the embedded default's contents and sizes, and where the o200k ranks come from."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers.paths import ROOT
from megatron_vpmoe.utils import paths
from megatron_vpmoe.utils.errors import InputError


def test_data_dir_precedence(tmp_path, monkeypatch):
    mine, env_dir = tmp_path / "mine", tmp_path / "env"
    mine.mkdir()
    env_dir.mkdir()
    monkeypatch.setenv("VPMOE_DATA", str(env_dir))
    assert paths.data_dir(str(mine)) == mine and paths.data_dir() == env_dir
    monkeypatch.setenv("VPMOE_DATA", str(tmp_path / "missing"))
    with pytest.raises(InputError, match="VPMOE_DATA=.*missing: no such data folder"):
        paths.data_dir()
    monkeypatch.delenv("VPMOE_DATA")
    shared = tmp_path / "shared"
    (shared / "data").mkdir(parents=True)
    monkeypatch.setattr(paths, "checkout_shared", lambda: shared)
    assert paths.data_dir() == shared / "data"
    monkeypatch.setattr(paths, "checkout_shared", lambda: None)  # a clone elsewhere, or an install
    assert paths.data_dir() == paths.embedded_data_dir() == ROOT / "megatron_vpmoe" / "data" / "default"


def test_embedded_default_matches_its_sources_and_size_limits():
    root = paths.embedded_data_dir()
    listed = set(re.findall(r"^\| ([\w/.]+) \|", (root / "SOURCES.md").read_text(), re.M)) - {"path"}
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"SOURCES.md"}
    assert listed == files  # every file has its source and license row, and nothing is unlisted
    sizes = [(root / f).stat().st_size for f in files]
    assert max(sizes) <= 2 * 2**20 and sum(sizes) <= 3 * 2**20
    assert len((root / "kd" / "gsm8k_train.jsonl").read_text().splitlines()) == 300


def test_o200k_ranks_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    assert paths.o200k_ranks_file() == tmp_path / "o200k_base.tiktoken"  # named even if absent: the error says so
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE")
    monkeypatch.setattr(paths, "checkout_shared", lambda: None)
    assert paths.o200k_ranks_file() is None  # tiktoken's own cache or download


def test_module_prints_the_folder_or_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("VPMOE_DATA", None)
    ok = subprocess.run([sys.executable, "-m", "megatron_vpmoe.utils.paths", "--data", str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == str(tmp_path)
    bad = subprocess.run([sys.executable, "-m", "megatron_vpmoe.utils.paths", "--data", str(tmp_path / "no")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1 and "no such data folder" in bad.stderr


def test_quickstart_refuses_a_missing_data_folder_in_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PY=sys.executable, QS=str(tmp_path / "qs"))
    for args, says in ((["--data", str(tmp_path / "no")], "no such data folder"), (["--bogus"], "usage:")):
        out = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh"), *args], env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and says in out.stderr, out.stderr
    assert not (tmp_path / "qs").exists()
