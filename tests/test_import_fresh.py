"""Every module of ``megatron_vpmoe`` (``kernels/`` as ``megatron_vpmoe.kernels``) imports on its own
in a fresh interpreter: a module that imports only after another one did, a cycle that breaks at
import time ("partially initialized module") or a broken import fails here with the module's name
and error (the static cycle check is tests/test_import_cycles.py).

One interpreter (tests/helpers/import_each.py) loads the third-party modules the package imports at
import time, then forks a child per module in which no module of the package is loaded yet: about
10 s on 2 cores instead of about 100 s for an interpreter per module. A module that needs an
optional dependency (setup.py's extras) that is not installed is skipped, the reason printed as a
warning; any other missing module is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

from helpers.package_modules import package_modules, third_party_imports
from helpers.paths import ROOT, TESTS

# setup.py's extras_require (and what they bring): the package imports them where it needs them
OPTIONAL = {"mpi4py", "triton", "transformer_engine", "wandb", "lm_eval", "accelerate"}


def import_each(modules: list, preload=(), pythonpath=ROOT) -> list:
    """One result dict per module (``ok``, ``missing``, ``error``), each imported alone."""
    cmd = [sys.executable, str(TESTS / "helpers" / "import_each.py"),
           *(arg for name in preload for arg in ("--preload", name)), "--", *modules]
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=pythonpath, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["module"] for r in results] == list(modules), out.stdout[-3000:]
    return results


def sort_results(results: list, optional=OPTIONAL) -> tuple:
    """(failed, skipped): skipped are the imports that lack only an optional dependency."""
    skipped = [r for r in results if not r["ok"] and r["missing"] and r["missing"].split(".")[0] in optional]
    failed = [r for r in results if not r["ok"] and r not in skipped]
    return failed, skipped


def test_every_module_imports_alone_in_a_fresh_interpreter():
    modules = list(package_modules())
    failed, skipped = sort_results(import_each(modules, preload=third_party_imports()))
    for r in skipped:
        warnings.warn(f"{r['module']} not imported: needs {r['missing']} (optional, not installed)")
    assert not failed, f"{len(failed)} of {len(modules)} modules fail to import on their own:\n\n" + "\n\n".join(
        f"{r['module']}:\n{r['error']}" for r in failed)


def test_the_check_catches_order_dependence_cycles_and_missing_modules(tmp_path):
    files = {
        "__init__.py": "",
        "registry.py": "TABLE = {}\n",
        "early.py": "from toypkg import registry\nregistry.TABLE['x'] = 1\n",
        "late.py": "from toypkg import registry\nVALUE = registry.TABLE['x']  # only after toypkg.early\n",
        "a.py": "from toypkg.b import B\nA = 1\n",
        "b.py": "from toypkg.a import A\nB = 2\n",
        "opt.py": "import vpmoe_absent_optional_dependency\n",
        "req.py": "import vpmoe_absent_required_dependency\n",
    }
    (tmp_path / "toypkg").mkdir()
    for name, text in files.items():
        (tmp_path / "toypkg" / name).write_text(text)
    modules = ["toypkg.early", "toypkg.late", "toypkg.a", "toypkg.opt", "toypkg.req", "toypkg.registry"]
    results = import_each(modules, preload=["json"], pythonpath=tmp_path)
    by_name = {r["module"]: r for r in results}
    assert by_name["toypkg.early"]["ok"] and by_name["toypkg.registry"]["ok"]
    assert "KeyError" in by_name["toypkg.late"]["error"]  # early ran in its own child, not before late
    assert "partially initialized module" in by_name["toypkg.a"]["error"]
    failed, skipped = sort_results(results, optional={"vpmoe_absent_optional_dependency"})
    assert [r["module"] for r in skipped] == ["toypkg.opt"]
    assert [r["module"] for r in failed] == ["toypkg.late", "toypkg.a", "toypkg.req"]
    assert by_name["toypkg.req"]["missing"] == "vpmoe_absent_required_dependency"
