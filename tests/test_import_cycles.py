"""No import cycles between modules of ``megatron_vpmoe`` (``kernels/`` included, as ``megatron_vpmoe.kernels``), read statically from every
``import`` statement (function-level ones too, so a lazy import cannot hide a cycle)."""

from __future__ import annotations

import ast
import functools

from helpers.package_modules import package_modules as _modules


def _owner(name: str, mods: dict):
    """The module an imported dotted name lives in (the longest prefix that is a module)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node, module: str, is_package: bool) -> list:
    """Dotted names one import statement asks for: ``import a.b`` -> a.b; ``from a import b, c``
    -> a.b, a.c (each resolves to a submodule, or to ``a`` when it is a name defined there)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names]


@functools.lru_cache(maxsize=1)
def import_graph() -> dict:
    """module -> the set of package modules it imports (implicit parent-package imports excluded)."""
    mods = _modules()
    graph = {}
    for module, path in mods.items():
        edges = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _targets(node, module, path.name == "__init__.py"):
                    target = _owner(name, mods)
                    if target and target != module:
                        edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checker_finds_cycles_and_resolves_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    # a function-level import is an edge (``harmony_tokenizer`` imports its builder when called)
    assert "megatron_vpmoe.tokenizers.tiktoken_variant" in graph["megatron_vpmoe.tokenizers"]
    # ``from package import name`` is an edge to the package, ``from package import module`` to the module
    assert "megatron_vpmoe.utils.atomic" in graph["megatron_vpmoe.config.loader"]
    assert "megatron_vpmoe.config" in graph["megatron_vpmoe.training.trainer"]
    assert "megatron_vpmoe.kernels.reference" in graph["megatron_vpmoe.kernels.ops"]  # kernels/ under its package name


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(" <-> ".join(c) for c in found)


# The package's layers, lowest first: a module imports only from its own layer or lower ones. Layers
# on one rank sit side by side and never import each other. Every subpackage's ``cli`` module (and
# the top-level ``megatron_vpmoe.cli``) is the CLI face above everything.
LAYERS = (
    ("utils",),
    ("kernels", "config"),
    ("tokenizers",),
    ("data",),
    ("model",),
    ("parallel",),
    ("plan",),
    ("training",),
    ("inference", "launch"),
    ("serve", "eval", "convert"),
    ("distill",),
    ("experiments",),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _layer(module: str):
    """The layer a module belongs to (None: the package's own ``__init__``/``__main__``)."""
    parts = module.split(".")
    if parts[1:] in ([], ["__main__"]):
        return None
    if parts[-1] == "cli":
        return "cli"
    return parts[1]


def upward_imports(graph: dict) -> list:
    """``(importer, imported)`` pairs whose target sits in a higher layer, or a different layer of the same rank."""
    found = []
    for module, targets in graph.items():
        src = _layer(module)
        for target in targets:
            dst = _layer(target)
            if src is None or dst is None or dst == src:
                continue
            if RANK[dst] > RANK[src] or RANK[dst] == RANK[src]:
                found.append((module, target))
    return sorted(found)


def test_the_layer_checker_finds_upward_and_sideways_imports():
    graph = {"megatron_vpmoe.data.chat": {"megatron_vpmoe.serve.app", "megatron_vpmoe.utils.errors"},
             "megatron_vpmoe.serve.app": {"megatron_vpmoe.eval.tasks", "megatron_vpmoe.data.chat"},
             "megatron_vpmoe.distill.corpus": {"megatron_vpmoe.cli", "megatron_vpmoe.data.cli"},
             "megatron_vpmoe.distill.cli": {"megatron_vpmoe.data.cli", "megatron_vpmoe.distill.corpus"}}
    assert upward_imports(graph) == [("megatron_vpmoe.data.chat", "megatron_vpmoe.serve.app"),
                                     ("megatron_vpmoe.distill.corpus", "megatron_vpmoe.cli"),
                                     ("megatron_vpmoe.distill.corpus", "megatron_vpmoe.data.cli"),
                                     ("megatron_vpmoe.serve.app", "megatron_vpmoe.eval.tasks")]


def test_every_subpackage_has_a_layer():
    unplaced = sorted({_layer(m) for m in import_graph()} - set(RANK) - {None})
    assert not unplaced, f"subpackages without a layer in LAYERS: {unplaced}"


def test_imports_follow_the_layers():
    found = upward_imports(import_graph())
    assert not found, f"{len(found)} import(s) against the layer order:\n" + "\n".join(f"{a} -> {b}" for a, b in found)
