"""The top-level ``kernels/`` folder is not a package: a Python started in the checkout root imports
Hugging Face's ``kernels`` (which transformers needs), and our kernels only as ``megatron_vpmoe.kernels``,
whose files link to ``kernels/`` one by one."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

from helpers.paths import ROOT


def test_kernels_folder_has_no_init_and_every_source_is_linked_into_the_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow Hugging Face's kernels"
    sources = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    package = ROOT / "megatron_vpmoe" / "kernels"
    linked = sorted(p.name for p in package.glob("*.py") if p.name != "__init__.py")
    assert sources and linked == sources, f"kernels/ and megatron_vpmoe/kernels/ differ: {sources} vs {linked}"
    for name in linked:
        assert (package / name).resolve() == (ROOT / "kernels" / name).resolve(), name


def test_kernels_in_the_checkout_root_is_not_ours():
    """From the root (first on sys.path, as for `python -c`), ``kernels`` is never our folder as a regular
    package; with Hugging Face's ``kernels`` installed, that is what imports."""
    probe = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
             "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    spec = json.loads(done.stdout)
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed here")
    assert spec is not None and spec[0] and not spec[0].startswith(str(ROOT / "kernels")), spec
    ours = str(ROOT / "kernels")
    assert ours not in spec[1], spec
