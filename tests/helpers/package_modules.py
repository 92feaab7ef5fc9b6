"""The modules of megatron_vpmoe (kernels/ linked in as megatron_vpmoe.kernels) read from the checkout's files."""

from __future__ import annotations

import ast
import sys

from helpers.paths import ROOT

# dotted package -> its folder: kernels/*.py are linked file by file into megatron_vpmoe/kernels/
PACKAGES = {"megatron_vpmoe": ROOT / "megatron_vpmoe"}


def package_modules() -> dict:
    """Dotted module name -> file, for every ``.py`` of the packages (a package is its ``__init__``)."""
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = (*pkg.split("."), *path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def third_party_imports() -> list:
    """Third-party modules the packages import at import time (outside functions), sorted."""
    names = set()

    class Visitor(ast.NodeVisitor):
        def visit_FunctionDef(self, node):  # a function body runs when called, not on import
            pass

        visit_AsyncFunctionDef = visit_FunctionDef

        def visit_Import(self, node):
            names.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node):
            if node.level == 0 and node.module:
                names.add(node.module)

    for path in package_modules().values():
        Visitor().visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    ours = {pkg.split(".")[0] for pkg in PACKAGES} | {"__future__"}
    return sorted(n for n in names if n.split(".")[0] not in ours and n.split(".")[0] not in sys.stdlib_module_names)
